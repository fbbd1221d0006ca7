// Helpers of the vectorised CPU loops (dropout.cpp, softmax_dropout.cpp): bfloat16 <-> float on
// raw bits, so that GCC vectorises the conversions (widen by a shift, narrow with
// round-to-nearest-even; a NaN stays a quiet NaN, as c10::BFloat16 does element by element), and
// the instruction set the loops run with, picked once at run time.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fedlease {

template <typename scalar_t>
[[gnu::always_inline]] inline float widen(scalar_t v) {
  return static_cast<float>(v);
}
template <>
[[gnu::always_inline]] inline float widen<c10::BFloat16>(c10::BFloat16 v) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(v.x) << 16);
}

template <typename scalar_t>
[[gnu::always_inline]] inline scalar_t narrow(float f) {
  return static_cast<scalar_t>(f);
}
template <>
[[gnu::always_inline]] inline c10::BFloat16 narrow<c10::BFloat16>(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return c10::BFloat16(f != f ? uint16_t{0x7FC0} : rounded, c10::BFloat16::from_bits());
}

enum class Isa { kGeneric, kAvx2, kAvx512 };

// The widest instruction set this CPU has, or a narrower one named by FEDLEASE_PHILOX_ISA
// (generic, avx2, avx512; read once) to measure or check the others on a wider CPU.
Isa best_isa();

// `return FN_<isa>(args...)` for best_isa()'s loops: FN_avx512 and FN_avx2 exist on x86 with
// GCC-compatible compilers (clones compiled with target attributes), FN_generic everywhere.
#if defined(__x86_64__) && defined(__GNUC__)
#define FEDLEASE_BY_ISA(FN, ...)       \
  switch (best_isa()) {                \
    case Isa::kAvx512:                 \
      return FN##_avx512(__VA_ARGS__); \
    case Isa::kAvx2:                   \
      return FN##_avx2(__VA_ARGS__);   \
    case Isa::kGeneric:                \
      break;                           \
  }                                    \
  return FN##_generic(__VA_ARGS__);
#else
#define FEDLEASE_BY_ISA(FN, ...) return FN##_generic(__VA_ARGS__);
#endif

}  // namespace fedlease
