// Inverted dropout from counter-based random numbers (philox.h): y = keep ? x / (1 - p) : 0 with
// the keep mask a pure function of (seed, element index).
//
// Against aten's CPU dropout (a Bernoulli draw per element from the mt19937 generator, 5-8 ns
// an element on one thread, then a multiply) this draws the words of 64 elements from 16
// Philox counters in vector registers and applies them in the same pass, in parallel over
// threads. The instruction set (AVX-512, AVX2 or portable C++) is picked once at run time; all
// three give the same words (tested).
//
// The op `philox_dropout` returns the keep mask (one byte an element) beside its output, and
// its backward scales dy by it (`apply_keep_mask`): a pass over a byte per element instead of a
// second Philox draw. The ops that draw a mask inside (moe_lora_linear.cpp,
// softmax_dropout.cpp) use dropout_rows on their own blocks.

#include "dropout.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>

#include "cpu_loops.h"
#include "philox.h"
#include "philox_x86.h"

namespace fedlease {
namespace {

// v times `scale` when kept, times 0 when dropped (as aten's dropout: NaN stays NaN), and
// acc + that, through float (widen / narrow, cpu_loops.h).
template <typename scalar_t>
[[gnu::always_inline]] inline scalar_t scaled(scalar_t v, bool keep, double scale) {
  const float s = static_cast<float>(scale);  // (cast inside the select: GCC left it scalar)
  return narrow<scalar_t>(widen(v) * (keep ? s : 0.0f));
}
template <>
[[gnu::always_inline]] inline double scaled<double>(double v, bool keep, double scale) {
  return v * (keep ? scale : 0.0);
}

template <typename scalar_t>
[[gnu::always_inline]] inline scalar_t plus_scaled(scalar_t acc, scalar_t v, bool keep,
                                                   double scale) {
  const float s = static_cast<float>(scale);
  return narrow<scalar_t>(widen(acc) + widen(v) * (keep ? s : 0.0f));
}
template <>
[[gnu::always_inline]] inline double plus_scaled<double>(double acc, double v, bool keep,
                                                         double scale) {
  return acc + v * (keep ? scale : 0.0);
}

// Blocks whose Philox words are drawn together (their rounds interleaved where the instruction
// set allows, philox_x86.h): 512 elements.
constexpr int kGroup = 4;

// The keep decision of a 16-bit value (philox.h): half `shift` / 16 of a word. A signed
// compare, which x86 vectors have for 32-bit lanes (the value and threshold are below 2^17).
[[gnu::always_inline]] inline bool kept(uint32_t word, int shift, int32_t thr) {
  return static_cast<int32_t>((word >> shift) & 0xFFFFu) >= thr;
}

// drop_blocks: blocks of 128 elements from block `first` on; each element's keep decision from
// its half of a Philox word (GROUP_WORDS fills kGroup blocks' words at once; past the last
// block they are drawn and unused), applied in -> out and written to `keep` when given.
// apply_keep: out = in scaled by a stored keep mask; add_kept: acc += that. All
// compiled once per instruction set and dtype, with everything inlined into each.
#define FEDLEASE_DROP(SUFFIX, ATTR, GROUP_WORDS, T)                                            \
  ATTR void drop_blocks_##SUFFIX(const T* in, T* out, uint8_t* keep, int64_t blocks,         \
                                 uint64_t first, uint64_t seed, uint32_t thr, double scale) {  \
    alignas(64) uint32_t w[kGroup * philox::kBlock];                                         \
    const int32_t t = static_cast<int32_t>(thr);                                             \
    for (int64_t b = 0; b < blocks; b += kGroup) {                                           \
      GROUP_WORDS(seed, first + b, w);                                                       \
      const int64_t nq = std::min<int64_t>(kGroup, blocks - b);                              \
      for (int64_t q = 0; q < nq; ++q) {                                                     \
        const uint32_t* wq = w + q * philox::kBlock;                                         \
        for (int half = 0; half < 2; ++half) {                                               \
          const int shift = 16 * half;                                                       \
          const int64_t e = (b + q) * philox::kSpan + half * philox::kBlock;                 \
          _Pragma("omp simd") for (int j = 0; j < philox::kBlock; ++j) out[e + j] =          \
              scaled(in[e + j], kept(wq[j], shift, t), scale);                               \
          if (keep) {                                                                        \
            _Pragma("omp simd") for (int j = 0; j < philox::kBlock; ++j) keep[e + j] =       \
                kept(wq[j], shift, t);                                                       \
          }                                                                                  \
        }                                                                                    \
      }                                                                                      \
    }                                                                                        \
  }                                                                                          \
  ATTR void apply_keep_##SUFFIX(const T* in, const uint8_t* keep, T* out, int64_t n,         \
                                double scale) {                                              \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) out[i] = scaled(in[i], keep[i], scale); \
  }                                                                                          \
  ATTR void add_kept_##SUFFIX(const T* in, const uint8_t* keep, T* acc, int64_t n,           \
                              double scale) {                                                \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) acc[i] =                             \
        plus_scaled(acc[i], in[i], keep[i], scale);                                          \
  }
#define FEDLEASE_DROP_ALL(SUFFIX, ATTR, GROUP_WORDS)      \
  FEDLEASE_DROP(SUFFIX, ATTR, GROUP_WORDS, float)         \
  FEDLEASE_DROP(SUFFIX, ATTR, GROUP_WORDS, double)        \
  FEDLEASE_DROP(SUFFIX, ATTR, GROUP_WORDS, c10::BFloat16) \
  FEDLEASE_DROP(SUFFIX, ATTR, GROUP_WORDS, c10::Half)

[[gnu::always_inline]] inline void group_words_generic(uint64_t seed, uint64_t block,
                                                       uint32_t* out) {
  for (int q = 0; q < kGroup; ++q) philox::block_words(seed, block + q, out + q * philox::kBlock);
}
FEDLEASE_DROP_ALL(generic, , group_words_generic)
#ifdef FEDLEASE_PHILOX_X86
[[gnu::target("avx2"), gnu::always_inline]] inline void group_words_avx2(uint64_t seed,
                                                                         uint64_t block,
                                                                         uint32_t* out) {
  for (int q = 0; q < kGroup; ++q)
    philox::block_words_avx2(seed, block + q, out + q * philox::kBlock);
}
[[gnu::target("avx512f"), gnu::always_inline]] inline void group_words_avx512(uint64_t seed,
                                                                           uint64_t block,
                                                                           uint32_t* out) {
  philox::blocks_words_avx512<kGroup>(seed, block, out);
}
FEDLEASE_DROP_ALL(avx2, [[gnu::target("avx2")]], group_words_avx2)
// avx512bw: the bfloat16 and mask bytes in 512-bit registers (with avx512f alone GCC narrowed
// them lane by lane: bf16 dropout took 1.8x the float32 time, 1.0x with it).
FEDLEASE_DROP_ALL(avx512, [[gnu::target("avx512f,avx512bw")]], group_words_avx512)
[[gnu::target("avx2")]] void words_avx2(uint64_t seed, uint64_t block, uint32_t* out) {
  philox::block_words_avx2(seed, block, out);
}
[[gnu::target("avx512f")]] void words_avx512(uint64_t seed, uint64_t block, uint32_t* out) {
  philox::block_words_avx512(seed, block, out);
}
#endif
#undef FEDLEASE_DROP_ALL
#undef FEDLEASE_DROP

bool cpu_has(Isa isa) {
#ifdef FEDLEASE_PHILOX_X86
  // bf16 / uint8 lanes of the AVX-512 loops want avx512bw (every AVX-512 Xeon has it)
  if (isa == Isa::kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (isa == Isa::kAvx2) return __builtin_cpu_supports("avx2");
#endif
  return isa == Isa::kGeneric;
}

}  // namespace

Isa best_isa() {
  static const Isa isa = [] {
    const Isa widest = cpu_has(Isa::kAvx512) ? Isa::kAvx512
                       : cpu_has(Isa::kAvx2) ? Isa::kAvx2
                                             : Isa::kGeneric;
    const char* env = std::getenv("FEDLEASE_PHILOX_ISA");
    const std::string want = env ? env : "";
    const Isa asked = want == "generic" ? Isa::kGeneric
                      : want == "avx2"  ? Isa::kAvx2
                                        : Isa::kAvx512;
    return std::min(asked, widest);
  }();
  return isa;
}

namespace {

template <typename scalar_t>
void drop_blocks_best(const scalar_t* in, scalar_t* out, uint8_t* keep, int64_t blocks,
                      uint64_t first, uint64_t seed, uint32_t thr, double scale) {
  FEDLEASE_BY_ISA(drop_blocks, in, out, keep, blocks, first, seed, thr, scale)
}

// in scaled by the mask into out (apply_keep), or added to it (add_kept: `accumulate`).
template <typename scalar_t>
void apply_keep_best(const scalar_t* in, const uint8_t* keep, scalar_t* out, int64_t n,
                     double scale, bool accumulate = false) {
  if (accumulate) {
    FEDLEASE_BY_ISA(add_kept, in, keep, out, n, scale)
  }
  FEDLEASE_BY_ISA(apply_keep, in, keep, out, n, scale)
}

double keep_scale(double p) { return 1.0 / (1.0 - p); }

// Elements [offset, offset + n): in -> out, and the keep mask into `keep` (if given).
template <typename scalar_t>
void draw_range(const scalar_t* in, scalar_t* out, uint8_t* keep, int64_t n, uint64_t offset,
                uint64_t seed, double p) {
  const uint32_t thr = philox::threshold(p);
  const double scale = keep_scale(p);
  auto one = [&](int64_t j, uint32_t value) {
    const bool k = value >= thr;
    if (keep) keep[j] = k;
    out[j] = scaled(in[j], k, scale);
  };
  int64_t i = 0;
  // head: up to the first element whose index is a multiple of the block
  for (; i < n && (offset + i) % philox::kSpan != 0; ++i)
    one(i, philox::value_of(seed, offset + i));
  const int64_t blocks = (n - i) / philox::kSpan;
  drop_blocks_best(in + i, out + i, keep ? keep + i : nullptr, blocks,
                   (offset + i) / philox::kSpan, seed, thr, scale);
  i += blocks * philox::kSpan;
  if (i < n) {  // tail: a partial block
    uint32_t w[philox::kBlock];
    philox::block_words(seed, (offset + i) / philox::kSpan, w);
    for (int j = 0; i + j < n; ++j)
      one(i + j, (w[j % philox::kBlock] >> (j < philox::kBlock ? 0 : 16)) & 0xFFFFu);
  }
}

void check_same(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.numel() == b.numel(),
              "dropout: contiguous tensors of equal size expected");
}

}  // namespace

void dropout_rows(const at::Tensor& in, at::Tensor& out, uint64_t offset, uint64_t seed,
                  double p, uint8_t* keep) {
  check_same(in, out);
  TORCH_CHECK(in.scalar_type() == out.scalar_type(), "dropout_rows: dtypes differ");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "dropout_rows", [&] {
    draw_range<scalar_t>(in.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), keep,
                         in.numel(), offset, seed, p);
  });
}

void apply_keep(const at::Tensor& in, const uint8_t* keep, at::Tensor& out, double p,
                bool accumulate) {
  check_same(in, out);
  TORCH_CHECK(in.scalar_type() == out.scalar_type(), "apply_keep: dtypes differ");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "apply_keep", [&] {
    apply_keep_best<scalar_t>(in.const_data_ptr<scalar_t>(), keep, out.data_ptr<scalar_t>(),
                              in.numel(), keep_scale(p), accumulate);
  });
}

std::vector<uint32_t> philox_block(uint64_t seed, uint64_t block, const std::string& isa) {
  std::vector<uint32_t> out(philox::kBlock);
  if (isa == "generic") {
    philox::block_words(seed, block, out.data());
    return out;
  }
#ifdef FEDLEASE_PHILOX_X86
  if (isa == "avx2" && cpu_has(Isa::kAvx2)) {
    words_avx2(seed, block, out.data());
    return out;
  }
  if (isa == "avx512" && cpu_has(Isa::kAvx512)) {
    words_avx512(seed, block, out.data());
    return out;
  }
#endif
  TORCH_CHECK(false, "this CPU or build has no ", isa, " Philox path");
}

std::string philox_isa() {
  switch (best_isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel chunk

void check_dropout_input(const at::Tensor& x, double p, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), "fedlease::", op, " needs a CPU tensor, got ", x.device());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fedlease::", op, ": p must be in [0, 1), got ", p);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fedlease::", op,
              " needs a floating tensor, got ", x.scalar_type());
}

// Returns (y, keep): the dropped tensor and its keep mask (uint8, one per element of x).
std::tuple<at::Tensor, at::Tensor> philox_dropout(const at::Tensor& x, double p, int64_t seed) {
  check_dropout_input(x, p, "philox_dropout");
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  at::Tensor keep = at::empty(in.sizes(), in.options().dtype(at::kByte));
  uint8_t* kp = keep.data_ptr<uint8_t>();
  const uint64_t s = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "philox_dropout",
                                  [&] {
    const scalar_t* ip = in.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, in.numel(), kGrain, [&](int64_t begin, int64_t end) {
      draw_range<scalar_t>(ip + begin, op + begin, kp + begin, end - begin, begin, s, p);
    });
  });
  return {out, keep};
}

// dy scaled by the keep mask of the forward: the backward of philox_dropout.
at::Tensor apply_keep_mask(const at::Tensor& dy, const at::Tensor& keep, double p) {
  check_dropout_input(dy, p, "apply_keep_mask");
  TORCH_CHECK(keep.scalar_type() == at::kByte && keep.numel() == dy.numel(),
              "fedlease::apply_keep_mask: a uint8 mask of dy's size expected");
  const at::Tensor in = dy.contiguous(), k = keep.contiguous();
  at::Tensor out = at::empty_like(in);
  const uint8_t* kp = k.const_data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "apply_keep_mask",
                                  [&] {
    const scalar_t* ip = in.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, in.numel(), kGrain, [&](int64_t begin, int64_t end) {
      apply_keep_best<scalar_t>(ip + begin, kp + begin, op + begin, end - begin, keep_scale(p));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fedlease, m) {
  m.def("philox_dropout(Tensor x, float p, int seed) -> (Tensor, Tensor)");
  m.def("apply_keep_mask(Tensor dy, Tensor keep, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(fedlease, CPU, m) {
  m.impl("philox_dropout", &philox_dropout);
  m.impl("apply_keep_mask", &apply_keep_mask);
}

}  // namespace fedlease
