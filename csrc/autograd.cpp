// The autograd formulas of the compiled CPU ops, in C++:
//
// - `fedlease::moe_lora_linear`, the MoE-LoRA linear layer as one differentiable op: the kernels
//   of moe_lora_linear.cpp (`moe_lora_linear_fwd` / `moe_lora_linear_bwd`) with the layer's
//   bookkeeping around them: the casts to the compute dtype (autocast's bfloat16 for float32
//   parameters), the experts' tensors laid out as the kernels want them (A_cat, B_cat, with a
//   client dimension) and the gradients brought back to each parameter's shape and dtype. One
//   client's tensors, or several clients' stacked (their tokens in turn in x, `shares` rows
//   each: equal shares when empty), one own expert per client.
// - `philox_dropout` (its backward scales dy by the forward's keep mask) and `apply_keep_mask`
//   (linear in dy for a fixed mask: its own backward), dropout.cpp.
// - `softmax_dropout`, attention probabilities with dropout (softmax_dropout.cpp).
//
// Done in Python (`torch.library.register_autograd` formulas, the casts and reshapes as
// separate autograd nodes) the same bookkeeping cost about 0.23 ms a layer call (forward and
// backward, 8 tokens) and 0.05 ms a dropout on the CPU; moving it here took a MiniLM bf16 step
// from 91.9 to 86.4 ms. Here each is one graph node.
//
// The formulas call the kernels through the dispatcher, so FakeTensor, torch.compile and
// opcheck see them (their fake implementations are in fedlease/ops/cpp_backend.py).

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fedlease {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using IntList = c10::IntArrayRef;
using FwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const std::optional<Tensor>&, const Tensor&, const std::optional<Tensor>&,
    const Tensor&, const Tensor&, const Tensor&, int64_t, IntList, IntList, int64_t, double,
    double, int64_t);
using BwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, IntList,
    IntList, double, double, int64_t, bool, bool, bool);

// The op `name` (its schema registered by this library); callers keep the handle in a static.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

c10::TypedOperatorHandle<FwdSig> fwd_op() {
  static const auto handle = op<FwdSig>("fedlease::moe_lora_linear_fwd");
  return handle;
}

c10::TypedOperatorHandle<BwdSig> bwd_op() {
  static const auto handle = op<BwdSig>("fedlease::moe_lora_linear_bwd");
  return handle;
}

// Autocast is left outside: the kernels pick their own precisions (float32 router logits).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// t in `dtype`, contiguous: t itself when it is already (calls below autograd may not return
// their input, and `to` / `contiguous` would).
Tensor dense(const Tensor& t, at::ScalarType dtype) {
  const Tensor c = t.scalar_type() == dtype ? t : t.to(dtype);
  return c.is_contiguous() ? c : c.contiguous();
}

std::optional<Tensor> dense(const std::optional<Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return dense(*t, dtype);
}

// The kernels' inputs: everything in the compute dtype, with a leading client dimension C (1
// for one client's router (S, in), A (M, R, in) and B (M, out, R); C for client-stacked
// (C, S, in), (C, M, R, in) and (C, M, out, R)): router (C, S, in), A as A_cat (C, M*R, in)
// and B as B_cat (C, out, M*R), contiguous.
struct Inputs {
  Tensor x, weight, router, a_cat, b_cat;
  std::optional<Tensor> x_drop, bias;

  Inputs(const Tensor& x_, const std::optional<Tensor>& x_drop_, const Tensor& weight_,
         const std::optional<Tensor>& bias_, const Tensor& router_, const Tensor& lora_a,
         const Tensor& lora_b, at::ScalarType dtype) {
    const bool stacked = lora_a.dim() == 4;
    TORCH_CHECK((lora_a.dim() == 3 || stacked) && lora_b.dim() == lora_a.dim() &&
                    router_.dim() == lora_a.dim() - 1,
                "fedlease::moe_lora_linear: router (S, in), lora_A (M, r, in) and lora_B "
                "(M, out, r) expected, each with a leading client dimension or none; got ",
                router_.sizes(), ", ", lora_a.sizes(), ", ", lora_b.sizes());
    const int64_t C = stacked ? lora_a.size(0) : 1, in = lora_a.size(-1);
    x = dense(x_, dtype);
    x_drop = dense(x_drop_, dtype);
    weight = dense(weight_, dtype);
    bias = dense(bias_, dtype);
    router = dense(router_, dtype).view({C, -1, in});
    a_cat = dense(lora_a, dtype).view({C, -1, in});
    const Tensor b = stacked ? lora_b.permute({0, 2, 1, 3}) : lora_b.permute({1, 0, 2});
    b_cat = dense(b, dtype).view({C, lora_b.size(-2), -1});
  }

  // (y, q, a, h) from the forward kernel.
  std::tuple<Tensor, Tensor, Tensor, Tensor> forward(int64_t M, IntList owns, IntList shares,
                                                     int64_t keep, double scaling, double p,
                                                     int64_t seed) const {
    return fwd_op().call(x, x_drop, weight, bias, router, a_cat, b_cat, M, owns, shares, keep,
                         scaling, p, seed);
  }
};

int64_t dtype_of(const Tensor& t) { return static_cast<int64_t>(t.scalar_type()); }
int64_t dtype_of(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? dtype_of(*t) : -1;
}

at::ScalarType compute_dtype(const Tensor& x, std::optional<at::ScalarType> dtype) {
  return dtype.value_or(x.scalar_type());
}

class MoELoRALinear : public torch::autograd::Function<MoELoRALinear> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x,
                        const std::optional<Tensor>& x_drop, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& router,
                        const Tensor& lora_a, const Tensor& lora_b, int64_t M, IntList owns,
                        int64_t keep, double scaling, double p, int64_t seed, IntList shares,
                        std::optional<at::ScalarType> dtype) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    NoAutocast no_autocast;
    const Inputs in(x, x_drop, weight, bias, router, lora_a, lora_b, compute_dtype(x, dtype));
    auto [y, q, a, h] = in.forward(M, owns, shares, keep, scaling, p, seed);
    ctx->save_for_backward({in.x, in.x_drop.value_or(Tensor()), in.weight, in.router, in.a_cat,
                            in.b_cat, q, a, h});
    ctx->saved_data["M"] = M;
    ctx->saved_data["owns"] = owns.vec();
    ctx->saved_data["shares"] = shares.vec();
    ctx->saved_data["router_shape"] = router.sizes().vec();  // each gradient's shape
    ctx->saved_data["a_shape"] = lora_a.sizes().vec();
    ctx->saved_data["b_shape"] = lora_b.sizes().vec();
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["dtypes"] = std::vector<int64_t>{
        dtype_of(x), dtype_of(x_drop), dtype_of(weight), dtype_of(bias),
        dtype_of(router), dtype_of(lora_a), dtype_of(lora_b)};  // each gradient's dtype
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    NoAutocast no_autocast;
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &x_drop = saved[1], &weight = saved[2], &router = saved[3];
    const Tensor &a_cat = saved[4], &b_cat = saved[5];
    auto& d = ctx->saved_data;
    const int64_t M = d["M"].toInt();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = ctx->needs_input_grad(2);
    const bool need_bias = d["has_bias"].toBool() && ctx->needs_input_grad(3);
    const Tensor dy = dense(grads[0], x.scalar_type());
    auto [dx, dx_drop, d_w, d_bias, d_router, d_a, d_b] = bwd_op().call(
        dy, x, x_drop.defined() ? std::optional<Tensor>(x_drop) : std::nullopt, weight, router,
        a_cat, b_cat, saved[6], saved[7], saved[8], M, d["owns"].toIntVector(),
        d["shares"].toIntVector(), d["scaling"].toDouble(), d["p"].toDouble(), d["seed"].toInt(),
        need_x, need_w, need_bias);
    const std::vector<int64_t> dtypes = d["dtypes"].toIntVector();
    auto as = [&](const Tensor& t, int input) {
      return dense(t, static_cast<at::ScalarType>(dtypes[input]));
    };
    // each parameter's own shape: lora_B's gradient (C, out, M*R) as (C, M, out, R)
    const std::vector<int64_t> b_shape = d["b_shape"].toIntVector();
    const int64_t C = d_b.size(0), out = d_b.size(1), r = b_shape.back();
    const Tensor d_lora_b = d_b.view({C, out, M, r}).permute({0, 2, 1, 3}).reshape(b_shape);
    return {
        need_x ? as(dx, 0) : Tensor(),
        x_drop.defined() ? as(dx_drop, 1) : Tensor(),
        need_w ? as(d_w, 2) : Tensor(),
        need_bias ? as(d_bias, 3) : Tensor(),
        as(d_router.view(d["router_shape"].toIntVector()), 4),
        as(d_a.view(d["a_shape"].toIntVector()), 5),
        as(d_lora_b, 6),
        Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
    };
  }
};

using DropoutSig = std::tuple<Tensor, Tensor>(const Tensor&, double, int64_t);
using ApplySig = Tensor(const Tensor&, const Tensor&, double);

c10::TypedOperatorHandle<DropoutSig> dropout_op() {
  static const auto handle = op<DropoutSig>("fedlease::philox_dropout");
  return handle;
}

c10::TypedOperatorHandle<ApplySig> apply_op() {
  static const auto handle = op<ApplySig>("fedlease::apply_keep_mask");
  return handle;
}

// (y, keep) = philox_dropout(x, p, seed); dx = apply_keep_mask(dy, keep, p). The mask output
// is not differentiable, and no zero gradient is made for an unused y.
class PhiloxDropout : public torch::autograd::Function<PhiloxDropout> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, double p, int64_t seed) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, keep] = dropout_op().call(x, p, seed);
    ctx->save_for_backward({keep});
    ctx->saved_data["p"] = p;
    ctx->mark_non_differentiable({keep});
    ctx->set_materialize_grads(false);
    return {y, keep};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor()};
    const Tensor keep = ctx->get_saved_variables()[0];
    return {apply_op().call(grads[0], keep, ctx->saved_data["p"].toDouble()), Tensor(), Tensor()};
  }
};

// dy scaled by a fixed mask: linear in dy, so its backward is itself.
class ApplyKeepMask : public torch::autograd::Function<ApplyKeepMask> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& dy, const Tensor& keep, double p) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({keep});
    ctx->saved_data["p"] = p;
    return apply_op().call(dy, keep, p);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor keep = ctx->get_saved_variables()[0];
    return {apply_op().call(grads[0], keep, ctx->saved_data["p"].toDouble()), Tensor(), Tensor()};
  }
};

using SoftmaxDropoutSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&,
                                                              const std::optional<Tensor>&,
                                                              double, double, int64_t);
using SoftmaxDropoutBackSig = Tensor(const Tensor&, const Tensor&, const Tensor&, double, double);

// (out, probs, keep) = softmax_dropout(scores, mask, scale, p, seed); d_scores from
// softmax_dropout_backward (softmax_dropout.cpp). probs and keep are not differentiable, the
// additive mask gets no gradient.
class SoftmaxDropout : public torch::autograd::Function<SoftmaxDropout> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& scores,
                               const std::optional<Tensor>& mask, double scale, double p,
                               int64_t seed) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto fwd = op<SoftmaxDropoutSig>("fedlease::softmax_dropout");
    auto [out, probs, keep] = fwd.call(scores, mask, scale, p, seed);
    ctx->save_for_backward({probs, keep});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["p"] = p;
    ctx->mark_non_differentiable({probs, keep});
    ctx->set_materialize_grads(false);
    return {out, probs, keep};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    static const auto bwd = op<SoftmaxDropoutBackSig>("fedlease::softmax_dropout_backward");
    const auto saved = ctx->get_saved_variables();
    Tensor d_scores = bwd.call(grads[0], saved[0], saved[1], ctx->saved_data["scale"].toDouble(),
                              ctx->saved_data["p"].toDouble());
    return {d_scores, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> softmax_dropout_autograd(const Tensor& scores,
                                                            const std::optional<Tensor>& mask,
                                                            double scale, double p,
                                                            int64_t seed) {
  auto out = SoftmaxDropout::apply(scores, mask, scale, p, seed);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor> philox_dropout_autograd(const Tensor& x, double p, int64_t seed) {
  auto out = PhiloxDropout::apply(x, p, seed);
  return {out[0], out[1]};
}

Tensor apply_keep_mask_autograd(const Tensor& dy, const Tensor& keep, double p) {
  return ApplyKeepMask::apply(dy, keep, p);
}

Tensor moe_lora_linear_autograd(const Tensor& x, const std::optional<Tensor>& x_drop,
                                const Tensor& weight, const std::optional<Tensor>& bias,
                                const Tensor& router, const Tensor& lora_a,
                                const Tensor& lora_b, int64_t M, IntList owns, int64_t keep,
                                double scaling, double p, int64_t seed, IntList shares,
                                std::optional<at::ScalarType> dtype) {
  return MoELoRALinear::apply(x, x_drop, weight, bias, router, lora_a, lora_b, M, owns, keep,
                              scaling, p, seed, shares, dtype);
}

// Below autograd (inference mode, or a caller already under it): the forward alone.
Tensor moe_lora_linear_cpu(const Tensor& x, const std::optional<Tensor>& x_drop,
                           const Tensor& weight, const std::optional<Tensor>& bias,
                           const Tensor& router, const Tensor& lora_a, const Tensor& lora_b,
                           int64_t M, IntList owns, int64_t keep, double scaling, double p,
                           int64_t seed, IntList shares, std::optional<at::ScalarType> dtype) {
  NoAutocast no_autocast;
  const Inputs in(x, x_drop, weight, bias, router, lora_a, lora_b, compute_dtype(x, dtype));
  return std::get<0>(in.forward(M, owns, shares, keep, scaling, p, seed));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fedlease, m) {
  m.def(
      "moe_lora_linear(Tensor x, Tensor? x_drop, Tensor weight, Tensor? bias, Tensor router, "
      "Tensor lora_A, Tensor lora_B, int num_experts, int[] own_experts, int keep, "
      "float scaling, float p, int seed, int[] shares=[], ScalarType? dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(fedlease, Autograd, m) {
  m.impl("moe_lora_linear", &moe_lora_linear_autograd);
  m.impl("philox_dropout", &philox_dropout_autograd);
  m.impl("apply_keep_mask", &apply_keep_mask_autograd);
  m.impl("softmax_dropout", &softmax_dropout_autograd);
}

TORCH_LIBRARY_IMPL(fedlease, CPU, m) { m.impl("moe_lora_linear", &moe_lora_linear_cpu); }

}  // namespace fedlease
