// The compiled MoE-LoRA op: ATen GEMMs for the matrix parts, one fused pass per direction for
// everything routing touches (OpenMP loops on CPU here; one thread per token on CUDA, in
// routing_cuda.cu, when the extension is built with CUDA).
//
// Forward:  z = x @ [router; A_cat]^T         (one GEMM; two when the experts see dropout(x))
//           per token: softmax over S slots, keep the `keep` best (ties to the lower slot),
//           renormalise, fold slots onto experts, h = gate * a        (fused, writes q and h)
//           y = base + scaling * h @ B_cat^T                          (one addmm)
// Backward: dH = dy @ B_cat                                            (one GEMM)
//           per token: gate gradient, restricted-softmax backward, dz = [dlogits, scaling*g*dH]
//           d[router; A_cat] = dz^T @ x, dx = dz @ [router; A_cat], dB_cat = scaling * dy^T @ h
//
// Slot s folds onto expert s when s < M and onto `own` otherwise; rank column j belongs to
// expert j / R. Routing is float32 for float32 and bfloat16 inputs, float64 for float64 inputs
// (so that gradcheck can run on this op).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "inputs.h"
#include "routing.h"
#include "routing_token.h"

namespace fedlease {

using at::Tensor;

namespace {
constexpr int64_t kGrain = 64;  // tokens per parallel chunk
}  // namespace

at::ScalarType routing_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const Tensor& x, const Tensor& router, const Tensor& a_cat, int64_t M) {
#ifdef FEDLEASE_WITH_CUDA
  TORCH_CHECK(x.device().is_cpu() || x.device().is_cuda(),
              "fedlease::moe_lora (cpp) needs CPU or CUDA tensors, got ", x.device());
#else
  TORCH_CHECK(x.device().is_cpu(), "fedlease::moe_lora (cpp) needs CPU tensors, got ",
              x.device());
#endif
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (tokens, features), got ", x.dim(), "-D");
  const bool half_ok = x.device().is_cuda() && x.scalar_type() == at::kHalf;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kDouble || half_ok,
              "fedlease::moe_lora (cpp) supports float32, bfloat16 and float64 (and float16 on "
              "CUDA), got ", x.scalar_type());
  TORCH_CHECK(M >= 1 && a_cat.size(0) % M == 0, "A_cat rows ", a_cat.size(0),
              " are not a multiple of num_experts ", M);
  TORCH_CHECK(router.size(1) == x.size(1) && a_cat.size(1) == x.size(1),
              "router/A_cat columns must equal x's features ", x.size(1));
}

// CPU routing passes (see routing.h): routing_token.h over chunks of tokens in parallel (or
// inline, when called from inside a parallel region).
void route_forward_cpu(const Tensor& logits, const Tensor& a, Tensor& q, Tensor& h, int64_t M,
                       int64_t own, int64_t keep) {
  const int64_t T = a.size(0), S = q.size(1), MR = h.size(1), R = MR / M;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "route_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* lp = logits.const_data_ptr<acc_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const int64_t ls = logits.stride(0), as = a.stride(0);
    acc_t* qp = q.data_ptr<acc_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> gate(M);
      for (int64_t t = begin; t < end; ++t)
        route_forward_token(lp + t * ls, ap + t * as, qp + t * S, hp + t * MR, gate.data(), S, M,
                            R, own, keep);
    });
  });
}

void route_backward_cpu(const Tensor& q, const Tensor& a, const Tensor& d_h, Tensor& dz,
                        int64_t M, int64_t own, double scaling) {
  const int64_t T = a.size(0), S = q.size(1), MR = d_h.size(1), R = MR / M;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "route_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dhp = d_h.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const acc_t* qp = q.const_data_ptr<acc_t>();
    const int64_t as = a.stride(0);
    scalar_t* dzp = dz.data_ptr<scalar_t>();
    at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> gate(M), d_gate(M);
      for (int64_t t = begin; t < end; ++t)
        route_backward_token(qp + t * S, ap + t * as, dhp + t * MR, dzp + t * (S + MR),
                             gate.data(), d_gate.data(), S, M, R, own,
                             static_cast<acc_t>(scaling));
    });
  });
}

namespace {

// Returns (y, q, a, h): output, kept slot probabilities (float32), projections, gated projections.
std::tuple<Tensor, Tensor, Tensor, Tensor> moe_lora_fwd(
    const Tensor& x, const std::optional<Tensor>& x_drop, const Tensor& router,
    const Tensor& a_cat, const Tensor& b_cat, const Tensor& base_out, int64_t M, int64_t own,
    int64_t keep, double scaling) {
  check_inputs(x, router, a_cat, M);
  const int64_t T = x.size(0), S = router.size(0), MR = a_cat.size(0);
  Tensor logits, a;
  if (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) {
    // Router logits in float32: 16-bit logits would round near-ties and flip the top-M choice.
    logits = at::mm(x.to(at::kFloat), router.to(at::kFloat).t());
    a = at::mm(x_drop.has_value() ? *x_drop : x, a_cat.t());
  } else if (x_drop.has_value()) {
    logits = at::mm(x, router.t());
    a = at::mm(*x_drop, a_cat.t());
  } else {
    Tensor z = at::mm(x, at::cat({router, a_cat}).t());
    logits = z.narrow(1, 0, S);
    a = z.narrow(1, S, MR);
  }
  Tensor q = at::empty({T, S}, x.options().dtype(routing_dtype(x)));
  Tensor h = at::empty({T, MR}, x.options());
#ifdef FEDLEASE_WITH_CUDA
  if (x.device().is_cuda())
    route_forward_cuda(logits, a, q, h, M, own, keep);
  else
#endif
    route_forward_cpu(logits, a, q, h, M, own, keep);
  Tensor y = at::addmm(base_out, h, b_cat.t(), 1.0, scaling);
  return {y, q, a.contiguous(), h};  // a: a (T x MR) copy out of z, small next to x
}

// Returns (dx, dx_drop, d_router, d_a_cat, d_b_cat); dx_drop is empty without dropout.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moe_lora_bwd(
    const Tensor& dy, const Tensor& x, const std::optional<Tensor>& x_drop, const Tensor& router,
    const Tensor& a_cat, const Tensor& b_cat, const Tensor& q, const Tensor& a, const Tensor& h,
    int64_t M, int64_t own, double scaling) {
  const int64_t T = x.size(0), S = router.size(0), MR = a_cat.size(0);
  Tensor d_h = at::mm(dy, b_cat);
  Tensor dz = at::empty({T, S + MR}, x.options());
#ifdef FEDLEASE_WITH_CUDA
  if (x.device().is_cuda())
    route_backward_cuda(q, a, d_h, dz, M, own, scaling);
  else
#endif
    route_backward_cpu(q, a, d_h, dz, M, own, scaling);
  Tensor d_b = at::mm(dy.t(), h).mul_(scaling);
  if (!x_drop.has_value()) {
    Tensor w_cat = at::cat({router, a_cat});
    Tensor dw = at::mm(dz.t(), x);
    Tensor dx = at::mm(dz, w_cat);
    return {dx, Tensor(), dw.narrow(0, 0, S), dw.narrow(0, S, MR), d_b};
  }
  Tensor dz_r = dz.narrow(1, 0, S), dz_a = dz.narrow(1, S, MR);
  return {at::mm(dz_r, router), at::mm(dz_a, a_cat), at::mm(dz_r.t(), x),
          at::mm(dz_a.t(), *x_drop), d_b};
}

}  // namespace

TORCH_LIBRARY(fedlease, m) {
  m.def(
      "moe_lora_fwd(Tensor x, Tensor? x_drop, Tensor router, Tensor a_cat, Tensor b_cat, "
      "Tensor base_out, int num_experts, int own_expert, int keep, float scaling) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "moe_lora_bwd(Tensor dy, Tensor x, Tensor? x_drop, Tensor router, Tensor a_cat, "
      "Tensor b_cat, Tensor q, Tensor a, Tensor h, int num_experts, int own_expert, "
      "float scaling) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fedlease, CPU, m) {
  m.impl("moe_lora_fwd", &moe_lora_fwd);
  m.impl("moe_lora_bwd", &moe_lora_bwd);
}

#ifdef FEDLEASE_WITH_CUDA
TORCH_LIBRARY_IMPL(fedlease, CUDA, m) {
  m.impl("moe_lora_fwd", &moe_lora_fwd);
  m.impl("moe_lora_bwd", &moe_lora_bwd);
}
#endif

}  // namespace fedlease
