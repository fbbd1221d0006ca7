// Counter-based dropout on CPU (dropout.cpp, philox.h), for the ops that draw their masks
// inside: the mask of element i of a row-major tensor depends on (seed, offset + i) alone, where
// `offset` places a block of rows within the whole tensor.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fedlease {

// out = dropout(in) as if `in` sat at element `offset` of a larger tensor (contiguous tensors of
// equal size and dtype: float32/64, bfloat16, float16; single-threaded; out may be in); the
// keep mask into `keep` too when given (one byte an element).
void dropout_rows(const at::Tensor& in, at::Tensor& out, uint64_t offset, uint64_t seed,
                  double p, uint8_t* keep = nullptr);

// out = in scaled by a keep mask: in / (1 - p) where kept, 0 where dropped (out may be in);
// with `accumulate`, out += that (one rounding).
void apply_keep(const at::Tensor& in, const uint8_t* keep, at::Tensor& out, double p,
                bool accumulate = false);

// The 64 Philox words of aligned block `block` from one implementation ("generic", "avx2",
// "avx512"; an error where the CPU lacks it), for tests that they agree; and the one in use.
std::vector<uint32_t> philox_block(uint64_t seed, uint64_t block, const std::string& isa);
std::string philox_isa();

}  // namespace fedlease
