// The whole MoE-LoRA linear layer as one CPU op: the frozen base GEMM, the routing and the LoRA
// update, computed block of tokens by block of tokens so that every row of x, y, dy and dx is
// brought from memory once and stays in cache for all the GEMMs that touch it.
//
// Shapes: x (T, in), W (out, in), bias (out) or none, router R (C, S, in), A_cat (C, M*R, in),
// B_cat (C, out, M*R); W_cat = [R; A_cat] (C, S + M*R, in). C clients share the frozen base:
// x holds their tokens in turn, `shares[c]` rows for client c, and a block of tokens never spans
// two clients, so each block uses its own client's router, experts and own expert. One client
// is the case C = 1.
//
// Forward, per block b of tokens (blocks in parallel, each GEMM single-threaded inside):
//   y_b  = x_b W^T (+ bias)                       base
//   z_b  = x_b W_cat^T                            router logits and every expert's projection
//   q_b, h_b = route(z_b)                         routing_token.h: softmax, top-keep, fold, gate
//   y_b += scaling * h_b B_cat^T                  in place: y_b is still in cache
// Backward, per block:
//   dx_b  = dy_b W                                base
//   dH_b  = dy_b B_cat;   dB_part += scaling * dy_b^T h_b
//   dz_b  = route_backward(q_b, a_b, dH_b)        [dlogits, scaling * g * dH]
//   dW_cat_part += dz_b^T x_b;   dx_b += dz_b W_cat
// With dropout (probability p) the experts see drop(x_b) and the router x_b: the keep mask is
// drawn inside the block from (seed, element index) (dropout.h) into a per-thread scratch that
// stays in cache, and the backward draws it again: dA_part += dz_a^T drop(x_b) and
// dx_b += drop(dz_a A_cat). dropout(x) is never stored. (A dropped input made outside the op,
// x_drop, is taken as it is: aten's dropout, for comparison.)
// The mask is keyed by the row's index in x (all clients' rows), so one client's mask does not
// depend on which block or call its rows fall in.
// Weight gradients are summed over tokens in per-thread float32 partials (one slab per thread
// and client, reduced once at the end): no atomics, and deterministic for a given thread count.
//
// Against the unfused form (base linear, then the op on its output) this saves a pass over dy,
// the separate dx of the LoRA path and its addition to the base dx, and the copy of the base
// output; the routing never leaves the block.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "dropout.h"
#include "inputs.h"
#include "routing.h"

namespace fedlease {
namespace {

using at::Tensor;

// Tokens per block: at most 512 (best of 64..2048 on a 2-core EPYC at in = out = 1024, where a
// block's rows of x and y take 2 MB each), fewer when that would leave threads idle.
constexpr int64_t kMaxBlock = 512, kMinBlock = 32;

int64_t block_size(int64_t T) {
  const int64_t threads = at::get_num_threads();
  return std::clamp((T + threads - 1) / threads, kMinBlock, kMaxBlock);
}

// How the experts' input is dropped: not at all; as `x_drop`, computed outside the op (aten's
// dropout); or with a mask drawn inside the op from (p, seed), block by block.
struct ExpertInput {
  const std::optional<Tensor>& x_drop;
  double p;
  int64_t seed;

  bool outside() const { return x_drop.has_value(); }
  bool inside() const { return !outside() && p > 0; }
  bool dropped() const { return outside() || p > 0; }
};

// A block's scratch rows (n x in, `options`'s dtype) in memory the calling thread keeps across
// calls: a fresh tensor per call would be a fresh mapping, page-faulted in on every step.
// `slot` tells two scratches of one thread apart.
Tensor thread_scratch(int64_t n, int64_t in, at::TensorOptions options, int slot) {
  static thread_local std::vector<char> buffers[2];
  std::vector<char>& buf = buffers[slot];
  const size_t bytes = static_cast<size_t>(n * in) * options.dtype().itemsize();
  if (buf.size() < bytes) buf.resize(bytes);
  return at::from_blob(buf.data(), {n, in}, options.device(at::kCPU));
}

// Rows [b0, b1) of x, all of them client `client`'s.
struct Block {
  int64_t client, b0, b1;
};

// The clients' shares of T rows (each client's row count, in turn) checked against C clients:
// empty means equal shares.
std::vector<int64_t> client_shares(int64_t T, int64_t C, c10::IntArrayRef shares) {
  if (shares.empty()) {
    TORCH_CHECK(C >= 1 && T % C == 0, "fedlease::moe_lora_linear: ", T, " tokens are not ", C,
                " equal shares; pass each client's share");
    return std::vector<int64_t>(C, T / C);
  }
  TORCH_CHECK(static_cast<int64_t>(shares.size()) == C, "fedlease::moe_lora_linear: ",
              shares.size(), " token shares for ", C, " clients");
  int64_t sum = 0;
  for (int64_t n : shares) {
    TORCH_CHECK(n >= 0, "fedlease::moe_lora_linear: a negative token share ", n);
    sum += n;
  }
  TORCH_CHECK(sum == T, "fedlease::moe_lora_linear: token shares sum to ", sum, ", x has ", T,
              " rows");
  return shares.vec();
}

// The blocks of x: each client's rows cut into blocks of at most block_size(T) rows.
std::vector<Block> blocks_of(int64_t T, const std::vector<int64_t>& shares) {
  const int64_t block = block_size(T);
  std::vector<Block> blocks;
  int64_t start = 0;
  for (int64_t c = 0; c < static_cast<int64_t>(shares.size()); ++c) {
    const int64_t end = start + shares[c];
    for (int64_t b = start; b < end; b += block) blocks.push_back({c, b, std::min(b + block, end)});
    start = end;
  }
  return blocks;
}

// Calls fn(block, thread) for every block, consecutive blocks split over threads; `thread`
// indexes the caller's per-thread partials.
template <typename Fn>
void for_each_block(const std::vector<Block>& blocks, Fn&& fn) {
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    // Autograd is handled around the op: the GEMMs inside (out= variants among them) run below
    // it. A guard per worker thread, as dispatch state is thread-local.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t thread = at::get_thread_num();
    for (int64_t i = begin; i < end; ++i) fn(blocks[i], thread);
  });
}

// The clients' routers, A_cat and B_cat (each (C, ...)) and own experts, checked against x.
void check_clients(const Tensor& x, const Tensor& router, const Tensor& a_cat,
                   const Tensor& b_cat, c10::IntArrayRef owns, int64_t M) {
  TORCH_CHECK(router.dim() == 3 && a_cat.dim() == 3 && b_cat.dim() == 3,
              "fedlease::moe_lora_linear: router (C, S, in), A_cat (C, M*R, in) and B_cat "
              "(C, out, M*R) expected");
  const int64_t C = router.size(0);
  TORCH_CHECK(a_cat.size(0) == C && b_cat.size(0) == C && static_cast<int64_t>(owns.size()) == C,
              "fedlease::moe_lora_linear: client counts differ: router ", router.size(0),
              ", A_cat ", a_cat.size(0), ", B_cat ", b_cat.size(0), ", own experts ",
              owns.size());
  TORCH_CHECK(C >= 1, "fedlease::moe_lora_linear: no clients");
  check_inputs(x, router[0], a_cat[0], M);
  for (int64_t own : owns)
    TORCH_CHECK(own >= 0 && own < M, "fedlease::moe_lora_linear: own expert ", own,
                " is not one of ", M, " experts");
}

// Client c's slice of each (C, ...) tensor, made once outside the threads.
std::vector<Tensor> per_client(const Tensor& t) { return t.unbind(0); }

// Returns (y, q, a, h), as moe_lora_fwd does, with y = x W^T + bias + the LoRA update, each
// client's rows through its own router and experts. The experts see x_drop when given, else
// dropout(x) with probability p (0: none) drawn from `seed`.
std::tuple<Tensor, Tensor, Tensor, Tensor> moe_lora_linear_fwd(
    const Tensor& x, const std::optional<Tensor>& x_drop, const Tensor& weight,
    const std::optional<Tensor>& bias, const Tensor& router, const Tensor& a_cat,
    const Tensor& b_cat, int64_t M, c10::IntArrayRef owns, c10::IntArrayRef shares, int64_t keep,
    double scaling, double p, int64_t seed) {
  check_clients(x, router, a_cat, b_cat, owns, M);
  TORCH_CHECK(x.device().is_cpu(), "fedlease::moe_lora_linear needs CPU tensors, got ",
              x.device());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "weight must be (out, in) with in = ", x.size(1), ", got ", weight.sizes());
  const int64_t T = x.size(0), S = router.size(1), MR = a_cat.size(1), out = weight.size(0);
  const std::vector<Block> blocks = blocks_of(T, client_shares(T, router.size(0), shares));
  const ExpertInput drop{x_drop, p, seed};
  const bool low = x.scalar_type() == at::kBFloat16;
  // Router logits in float32 for 16-bit inputs (rounded logits flip near-tied top-M choices).
  const Tensor w_t = weight.t();
  const auto r_w = per_client(low ? router.to(at::kFloat) : router);
  const auto w_cat = (low || drop.dropped()) ? std::vector<Tensor>()
                                             : per_client(at::cat({router, a_cat}, 1));
  const auto a_c = per_client(a_cat), b_c = per_client(b_cat);

  Tensor y = at::empty({T, out}, x.options());
  Tensor q = at::empty({T, S}, x.options().dtype(routing_dtype(x)));
  Tensor a = at::empty({T, MR}, x.options());
  Tensor h = at::empty({T, MR}, x.options());
  for_each_block(blocks, [&](const Block& blk, int64_t thread) {
    const int64_t c = blk.client, b0 = blk.b0, n = blk.b1 - blk.b0;
    const Tensor x_b = x.narrow(0, b0, n);
    Tensor y_b = y.narrow(0, b0, n), a_b = a.narrow(0, b0, n), h_b = h.narrow(0, b0, n);
    Tensor q_b = q.narrow(0, b0, n);
    if (bias.has_value())
      at::addmm_out(y_b, *bias, x_b, w_t);
    else
      at::mm_out(y_b, x_b, w_t);
    Tensor logits;
    if (!w_cat.empty()) {
      const Tensor z = at::mm(x_b, w_cat[c].t());
      logits = z.narrow(1, 0, S);
      a_b.copy_(z.narrow(1, S, MR));
    } else {
      logits = at::mm(low ? x_b.to(at::kFloat) : x_b, r_w[c].t());
      Tensor experts_in = x_b;
      if (drop.outside()) {
        experts_in = x_drop->narrow(0, b0, n);
      } else if (drop.inside()) {
        experts_in = thread_scratch(n, x.size(1), x.options(), 0);
        dropout_rows(x_b, experts_in, static_cast<uint64_t>(b0 * x.size(1)),
                     static_cast<uint64_t>(seed), p);
      }
      at::mm_out(a_b, experts_in, a_c[c].t());
    }
    route_forward_cpu(logits, a_b, q_b, h_b, M, owns[c], keep);
    y_b.addmm_(h_b, b_c[c].t(), 1.0, scaling);
  });
  return {y, q, a, h};
}

// Returns (dx, dx_drop, d_weight, d_bias, d_router, d_a_cat, d_b_cat), the last three (C, ...)
// like their inputs; dx_drop is empty unless x_drop was given, dx / d_weight / d_bias unless
// asked for (the base is normally frozen, and a first layer's input needs no gradient). x_drop, p, seed, owns and shares: the forward's. With a mask
// drawn inside, the backward draws it again, once per block (with drop(x_b), for dA) and applies
// it to dz_a A_cat (added to dx).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> moe_lora_linear_bwd(
    const Tensor& dy, const Tensor& x, const std::optional<Tensor>& x_drop, const Tensor& weight,
    const Tensor& router, const Tensor& a_cat, const Tensor& b_cat, const Tensor& q,
    const Tensor& a, const Tensor& h, int64_t M, c10::IntArrayRef owns, c10::IntArrayRef shares,
    double scaling, double p, int64_t seed, bool need_input_grad, bool need_weight_grad,
    bool need_bias_grad) {
  check_clients(x, router, a_cat, b_cat, owns, M);
  const int64_t T = x.size(0), C = router.size(0), S = router.size(1), MR = a_cat.size(1);
  const int64_t in = x.size(1), out = weight.size(0);
  const std::vector<Block> blocks = blocks_of(T, client_shares(T, C, shares));
  const ExpertInput drop{x_drop, p, seed};
  const int64_t threads = at::get_num_threads();
  const auto f32 = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  Tensor db_part = at::zeros({threads, C, out, MR}, f32);
  Tensor dw_part = at::zeros({threads, C, S + MR, in}, f32);  // rows: router, then A_cat
  const auto w_cat = per_client(at::cat({router, a_cat}, 1));
  const auto r_c = per_client(router), a_c = per_client(a_cat), b_c = per_client(b_cat);
  const Tensor dy_t = dy.t();

  Tensor dx = need_input_grad ? at::empty({T, in}, x.options()) : Tensor();
  Tensor dx_drop = drop.outside() ? at::empty({T, in}, x.options()) : Tensor();
  for_each_block(blocks, [&](const Block& blk, int64_t thread) {
    const int64_t c = blk.client, b0 = blk.b0, n = blk.b1 - blk.b0;
    const Tensor dy_b = dy.narrow(0, b0, n), x_b = x.narrow(0, b0, n);
    Tensor dx_b = need_input_grad ? dx.narrow(0, b0, n) : Tensor(), dw = dw_part[thread][c];
    if (need_input_grad) at::mm_out(dx_b, dy_b, weight);
    const Tensor d_h = at::mm(dy_b, b_c[c]);
    db_part[thread][c].add_(at::mm(dy_t.narrow(1, b0, n), h.narrow(0, b0, n)), scaling);
    Tensor dz = at::empty({n, S + MR}, x.options());
    route_backward_cpu(q.narrow(0, b0, n), a.narrow(0, b0, n), d_h, dz, M, owns[c], scaling);
    if (!drop.dropped()) {
      dw.add_(at::mm(dz.t(), x_b));
      if (need_input_grad) dx_b.addmm_(dz, w_cat[c]);
      return;
    }
    const Tensor dz_r = dz.narrow(1, 0, S), dz_a = dz.narrow(1, S, MR);
    dw.narrow(0, 0, S).add_(at::mm(dz_r.t(), x_b));
    if (need_input_grad) dx_b.addmm_(dz_r, r_c[c]);
    if (drop.outside()) {
      dw.narrow(0, S, MR).add_(at::mm(dz_a.t(), x_drop->narrow(0, b0, n)));
      Tensor dx_drop_b = dx_drop.narrow(0, b0, n);
      at::mm_out(dx_drop_b, dz_a, a_c[c]);
      return;
    }
    uint8_t* keep_b = thread_scratch(n, in, x.options().dtype(at::kByte), 1).data_ptr<uint8_t>();
    Tensor buf = thread_scratch(n, in, x.options(), 0);
    // the experts' input as the forward saw it, and its mask, in one pass
    dropout_rows(x_b, buf, static_cast<uint64_t>(b0 * in), static_cast<uint64_t>(seed), p,
                 keep_b);
    dw.narrow(0, S, MR).add_(at::mm(dz_a.t(), buf));
    if (!need_input_grad) return;
    at::mm_out(buf, dz_a, a_c[c]);  // d(experts' input), through the mask onto dx
    apply_keep(buf, keep_b, dx_b, p, /*accumulate=*/true);
  });
  const Tensor dw = dw_part.sum(0).to(x.scalar_type());
  const Tensor d_weight = need_weight_grad ? at::mm(dy_t, x) : Tensor();
  const Tensor d_bias = need_bias_grad ? dy.sum(0) : Tensor();
  return {dx, dx_drop, d_weight, d_bias, dw.narrow(1, 0, S), dw.narrow(1, S, MR),
          db_part.sum(0).to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fedlease, m) {
  m.def(
      "moe_lora_linear_fwd(Tensor x, Tensor? x_drop, Tensor weight, Tensor? bias, "
      "Tensor router, Tensor a_cat, Tensor b_cat, int num_experts, int[] own_experts, "
      "int[] shares, int keep, float scaling, float p, int seed) -> (Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "moe_lora_linear_bwd(Tensor dy, Tensor x, Tensor? x_drop, Tensor weight, Tensor router, "
      "Tensor a_cat, Tensor b_cat, Tensor q, Tensor a, Tensor h, int num_experts, "
      "int[] own_experts, int[] shares, float scaling, float p, int seed, bool need_input_grad, "
      "bool need_weight_grad, bool need_bias_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fedlease, CPU, m) {
  m.impl("moe_lora_linear_fwd", &moe_lora_linear_fwd);
  m.impl("moe_lora_linear_bwd", &moe_lora_linear_bwd);
}

}  // namespace fedlease
