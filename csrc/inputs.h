// Input checks shared by the compiled MoE-LoRA ops (moe_lora.cpp, moe_lora_linear.cpp).
#pragma once

#include <ATen/ATen.h>

namespace fedlease {

// float64 routing for float64 inputs (gradcheck), float32 otherwise.
at::ScalarType routing_dtype(const at::Tensor& x);

// x (T, in) on a supported device and dtype; router (S, in); A_cat (M*R, in).
void check_inputs(const at::Tensor& x, const at::Tensor& router, const at::Tensor& a_cat,
                  int64_t M);

}  // namespace fedlease
