// Attention probabilities with dropout in one op (CPU): probs = softmax(scale * scores + mask)
// over the last dimension, out = dropout(probs) with the counter-based mask of dropout.h (the
// mask philox_dropout would draw for probs under the same seed), and the backward
//   d_scores = scale * probs * (g' - <g', probs>),  g' = keep * g / (1 - p),
// each in one pass over a block of rows that stays in cache. Unfused, the same work is five
// passes over the (batch, heads, queries, keys) tensor forward (scaling multiply, mask add,
// softmax, dropout) and three backward (mask, softmax backward, scaling multiply).
//
// exp is 2^n times a polynomial for 2^f (|f| <= 1/2, degree 6: a few ulp of float32's exp over
// the softmax's range), written so that GCC vectorises it in the AVX2 / AVX-512 row loops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_loops.h"
#include "dropout.h"

namespace fedlease {
namespace {

using at::Tensor;

[[gnu::always_inline]] inline float exp_poly(float x) {
  // Softmax arguments are <= 0. Below -80 the result is 0 (exp(-80) is 2e-35 of the row's
  // largest term, 1): near float32's smallest normals, denormal arithmetic took 100x longer.
  const bool tiny = x < -80.0f;
  x = tiny ? -80.0f : x;
  const float t = x * 1.44269504088896341f;  // x / ln 2 = n + f, n an integer, |f| <= 1/2
  const float shifted = t + 12582912.0f;     // 1.5 * 2^23: t rounded, n in the low bits
  const float n = shifted - 12582912.0f;
  const float f = t - n;
  float p = 1.5403530393381606e-4f;  // 2^f: Taylor series of exp(f ln 2) to degree 6
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (__builtin_bit_cast(int32_t, shifted) - 0x4B400000 + 127) << 23;  // 2^n
  return tiny ? 0.0f : p * __builtin_bit_cast(float, bits);
}

// Rows [0, rows) of length L: probs = softmax(scale * x + mask_row), `row` a float scratch of
// L. masks[i]: row i's additive mask (L floats, contiguous) or a row of zeros.
#define FEDLEASE_SOFTMAX(SUFFIX, ATTR, T)                                                     \
  ATTR void softmax_rows_##SUFFIX(const T* x, const float* const* masks, T* probs,           \
                                  int64_t rows, int64_t L, float scale, float* row) {       \
    for (int64_t i = 0; i < rows; ++i) {                                                     \
      const T* xi = x + i * L;                                                               \
      const float* mi = masks[i];                                                            \
      float mx = -INFINITY;                                                                  \
      _Pragma("omp simd reduction(max : mx)") for (int64_t j = 0; j < L; ++j) {              \
        const float v = widen(xi[j]) * scale + mi[j];                                        \
        row[j] = v;                                                                          \
        mx = v > mx ? v : mx; /* (std::max's references kept this loop scalar) */            \
      }                                                                                      \
      float sum = 0.0f;                                                                      \
      _Pragma("omp simd reduction(+ : sum)") for (int64_t j = 0; j < L; ++j) {               \
        const float e = exp_poly(row[j] - mx);                                               \
        row[j] = e;                                                                          \
        sum += e;                                                                            \
      }                                                                                      \
      const float inv = 1.0f / sum;                                                          \
      T* pi = probs + i * L;                                                                 \
      _Pragma("omp simd") for (int64_t j = 0; j < L; ++j) pi[j] = narrow<T>(row[j] * inv);   \
    }                                                                                        \
  }                                                                                          \
  ATTR void softmax_dropout_back_##SUFFIX(const T* g, const uint8_t* keep, const T* probs,    \
                                          T* dx, int64_t rows, int64_t L, float scale,       \
                                          float keep_scale) {                                \
    for (int64_t i = 0; i < rows; ++i) {                                                     \
      const T *gi = g + i * L, *pi = probs + i * L;                                          \
      const uint8_t* ki = keep + i * L;                                                      \
      float dot = 0.0f;                                                                      \
      _Pragma("omp simd reduction(+ : dot)") for (int64_t j = 0; j < L; ++j) dot +=          \
          widen(gi[j]) * (ki[j] ? keep_scale : 0.0f) * widen(pi[j]);                         \
      T* di = dx + i * L;                                                                    \
      _Pragma("omp simd") for (int64_t j = 0; j < L; ++j) di[j] = narrow<T>(                 \
          scale * widen(pi[j]) * (widen(gi[j]) * (ki[j] ? keep_scale : 0.0f) - dot));        \
    }                                                                                        \
  }
#define FEDLEASE_SOFTMAX_ALL(SUFFIX, ATTR)        \
  FEDLEASE_SOFTMAX(SUFFIX, ATTR, float)           \
  FEDLEASE_SOFTMAX(SUFFIX, ATTR, c10::BFloat16)
FEDLEASE_SOFTMAX_ALL(generic, )
#if defined(__x86_64__) && defined(__GNUC__)  // (the clones FEDLEASE_BY_ISA calls)
FEDLEASE_SOFTMAX_ALL(avx2, [[gnu::target("avx2")]])
FEDLEASE_SOFTMAX_ALL(avx512, [[gnu::target("avx512f,avx512bw")]])
#endif

template <typename T>
void softmax_rows(const T* x, const float* const* masks, T* probs, int64_t rows, int64_t L,
                  float scale, float* row) {
  FEDLEASE_BY_ISA(softmax_rows, x, masks, probs, rows, L, scale, row)
}

template <typename T>
void softmax_dropout_back(const T* g, const uint8_t* keep, const T* probs, T* dx, int64_t rows,
                          int64_t L, float scale, float keep_scale) {
  FEDLEASE_BY_ISA(softmax_dropout_back, g, keep, probs, dx, rows, L, scale, keep_scale)
}

// f(scalar_t{}) for float32 or bfloat16 tensors (checked by check_scores).
template <typename F>
void by_dtype(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat)
    f(float{});
  else
    f(c10::BFloat16{});
}

// Rows per parallel chunk: about 32k elements.
int64_t row_grain(int64_t L) { return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(L, 1)); }

void check_scores(const Tensor& t, double p, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "fedlease::softmax_dropout: CPU tensors, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "fedlease::softmax_dropout: float32 or bfloat16 ", what, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) > 0, "fedlease::softmax_dropout: empty rows");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fedlease::softmax_dropout: p must be in [0, 1), got ", p);
}

// Returns (out, probs, keep): dropout(probs), probs, the keep mask (uint8). `mask`: additive,
// broadcastable to scores (e.g. (batch, 1, queries, keys) against (batch, heads, queries, keys)).
std::tuple<Tensor, Tensor, Tensor> softmax_dropout(const Tensor& scores,
                                                   const std::optional<Tensor>& mask,
                                                   double scale, double p, int64_t seed) {
  check_scores(scores, p, "scores");
  const Tensor x = scores.contiguous();
  const int64_t L = x.size(-1), rows = x.numel() / L, D = x.dim();
  // the mask in float32, its rows addressed through broadcast strides (nothing materialised)
  Tensor m;
  std::vector<int64_t> m_strides(D, 0);
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->device().is_cpu(), "fedlease::softmax_dropout: the mask must be on the CPU "
                "with the scores, got ", mask->device());
    m = mask->to(at::kFloat).contiguous();
    TORCH_CHECK(m.dim() <= D, "fedlease::softmax_dropout: mask has more dimensions than scores");
    const Tensor e = m.expand(x.sizes());
    TORCH_CHECK(e.stride(D - 1) == 1, "fedlease::softmax_dropout: the mask's last dimension "
                "must match the scores' (got ", m.sizes(), " for ", x.sizes(), ")");
    for (int64_t d = 0; d < D; ++d) m_strides[d] = e.stride(d);
  }
  const std::vector<float> zeros(L, 0.0f);
  const float* mp = m.defined() ? m.const_data_ptr<float>() : nullptr;
  auto mask_row = [&](int64_t r) -> const float* {
    if (!mp) return zeros.data();
    int64_t offset = 0;
    for (int64_t d = D - 2; d >= 0; --d) {
      offset += (r % x.size(d)) * m_strides[d];
      r /= x.size(d);
    }
    return mp + offset;
  };
  Tensor probs = at::empty_like(x), out = at::empty_like(x);
  Tensor keep = at::empty(x.sizes(), x.options().dtype(at::kByte));
  by_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* pp = probs.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(L), [&](int64_t r0, int64_t r1) {
      std::vector<float> row(L);
      std::vector<const float*> masks(r1 - r0);
      for (int64_t r = r0; r < r1; ++r) masks[r - r0] = mask_row(r);
      softmax_rows(xp + r0 * L, masks.data(), pp + r0 * L, r1 - r0, L, static_cast<float>(scale),
                   row.data());
      // the chunk's dropout while it is in cache: element indices as in the whole tensor
      const Tensor in_c = probs.view(-1).narrow(0, r0 * L, (r1 - r0) * L);
      Tensor out_c = out.view(-1).narrow(0, r0 * L, (r1 - r0) * L);
      dropout_rows(in_c, out_c, static_cast<uint64_t>(r0 * L), static_cast<uint64_t>(seed), p,
                   keep.data_ptr<uint8_t>() + r0 * L);
    });
  });
  return {out, probs, keep};
}

// d_scores from the gradient of out, the forward's keep mask and probs.
Tensor softmax_dropout_backward(const Tensor& grad, const Tensor& probs, const Tensor& keep,
                                double scale, double p) {
  check_scores(probs, p, "probs");
  const Tensor g = grad.to(probs.scalar_type()).contiguous();
  TORCH_CHECK(g.sizes() == probs.sizes() && keep.sizes() == probs.sizes() &&
                  keep.scalar_type() == at::kByte,
              "fedlease::softmax_dropout_backward: grad, probs and keep of one shape expected");
  const Tensor pr = probs.contiguous(), k = keep.contiguous();
  const int64_t L = pr.size(-1), rows = pr.numel() / L;
  Tensor dx = at::empty_like(pr);
  by_dtype(pr.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *ppr = pr.const_data_ptr<scalar_t>();
    const uint8_t* kp = k.const_data_ptr<uint8_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(L), [&](int64_t r0, int64_t r1) {
      softmax_dropout_back(gp + r0 * L, kp + r0 * L, ppr + r0 * L, dp + r0 * L, r1 - r0, L,
                           static_cast<float>(scale), static_cast<float>(1.0 / (1.0 - p)));
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fedlease, m) {
  m.def(
      "softmax_dropout(Tensor scores, Tensor? mask, float scale, float p, int seed) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "softmax_dropout_backward(Tensor grad, Tensor probs, Tensor keep, float scale, float p) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(fedlease, CPU, m) {
  m.impl("softmax_dropout", &softmax_dropout);
  m.impl("softmax_dropout_backward", &softmax_dropout_backward);
}

}  // namespace fedlease
