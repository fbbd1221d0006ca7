// Counter-based random numbers for dropout: Philox4x32-10 (Salmon et al., SC'11, the generator
// of cuRAND, Triton's tl.rand and PyTorch's CUDA dropout), keyed by a 64-bit seed.
//
// A dropout mask is a pure function of (seed, element index). Block b of the words is the 64
// words of the 16 counters b * 16 .. b * 16 + 15 (word k of the block: word (k / 16) of counter
// b * 16 + k % 16), computed side by side: loops the compiler vectorises (AVX2 / AVX-512 clones
// below). Each word serves two elements, 16 bits each: element i (row-major) draws, of word
// (i % 64) of block i / 128, the low half when i % 128 < 64 and the high half otherwise. No
// counter is used twice. The same seed gives the same mask whatever the thread count or
// blocking, so a backward pass can regenerate its forward's mask instead of storing it. An
// element is kept when its 16-bit value is >= threshold(p) = round(p * 2^16): keep probability
// 1 - threshold / 2^16 (p within 2^-17 of what was asked). 16 bits, not 32, an element: half
// the Philox rounds per mask, which were most of a dropout's time on the CPU.
#pragma once

#include <cstdint>

namespace fedlease {
namespace philox {

constexpr uint32_t kMulA = 0xD2511F53u, kMulB = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;  // Weyl key increments
constexpr int kRounds = 10;
constexpr int kLanes = 16;                // counters computed side by side
constexpr int kBlock = 4 * kLanes;        // words per block of counters
constexpr int kSpan = 2 * kBlock;         // elements per block of counters (16 bits each)

// One Philox4x32 bijection of counter (c0, c1, c2, c3) under key (k0, k1), in place.
inline void bijection(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                      uint32_t k1) {
  for (int r = 0; r < kRounds; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kMulA) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kMulB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

// The four words of counter `counter` (high word in c1; c2 = c3 = 0) under `seed`.
inline void words(uint64_t seed, uint64_t counter, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  bijection(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The 16-bit value element `index` draws (the layout in the header comment).
inline uint32_t value_of(uint64_t seed, uint64_t index) {
  const uint64_t k = index % kBlock;  // its word within the block
  uint32_t w[4];
  words(seed, (index / kSpan) * kLanes + k % kLanes, w);
  return (w[k / kLanes] >> (index % kSpan < kBlock ? 0 : 16)) & 0xFFFFu;
}

// The 64 words of block `block` (elements block*128 .. block*128+127), in word order.
// Structure-of-arrays loops over kLanes counters, inlined into vectorised callers.
[[gnu::always_inline]] inline void block_words(uint64_t seed, uint64_t block,
                                               uint32_t out[kBlock]) {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  const uint64_t first = block * kLanes;
#pragma omp simd
  for (int i = 0; i < kLanes; ++i) {
    const uint64_t counter = first + i;
    c0[i] = static_cast<uint32_t>(counter);
    c1[i] = static_cast<uint32_t>(counter >> 32);
    c2[i] = 0;
    c3[i] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kRounds; ++r) {
#pragma omp simd  // without it GCC unrolls the lanes and keeps them scalar
    for (int i = 0; i < kLanes; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(kMulA) * c0[i];
      const uint64_t p1 = static_cast<uint64_t>(kMulB) * c2[i];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[i] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[i] ^ k1;
      c1[i] = static_cast<uint32_t>(p1);
      c3[i] = static_cast<uint32_t>(p0);
      c0[i] = n0;
      c2[i] = n2;
    }
    k0 += kKeyA;
    k1 += kKeyB;
  }
#pragma omp simd
  for (int i = 0; i < kLanes; ++i) {
    out[i] = c0[i];
    out[kLanes + i] = c1[i];
    out[2 * kLanes + i] = c2[i];
    out[3 * kLanes + i] = c3[i];
  }
}

// p in [0, 1) -> the keep threshold on a 16-bit value (2^16: nothing kept).
inline uint32_t threshold(double p) { return static_cast<uint32_t>(p * 65536.0 + 0.5); }

}  // namespace philox
}  // namespace fedlease
