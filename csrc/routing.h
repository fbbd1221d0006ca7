// The per-token routing passes of the MoE-LoRA op, one implementation per device.
//
// route_forward:  q[t, :] = kept, renormalised slot probabilities of logits[t, :] (top `keep`
//                 by logit, ties to the lower slot); gate = q folded onto experts (slot s ->
//                 s if s < M else own); h[t, j] = a[t, j] * gate[j / R].
// route_backward: dz[:, S + j] = scaling * dH[t, j] * gate[j / R]  (gradient w.r.t. a), and
//                 dz[:, s] = q[s] * (dgate[fold(s)] - sum_u q[u] dgate[fold(u)])  (logits),
//                 with dgate[e] = scaling * sum_{j in e} dH[t, j] a[t, j].
#pragma once

#include <ATen/ATen.h>

namespace fedlease {

// CPU (moe_lora.cpp): rows of q, h, dz and d_h contiguous; logits and a may be strided views.
void route_forward_cpu(const at::Tensor& logits, const at::Tensor& a, at::Tensor& q,
                       at::Tensor& h, int64_t M, int64_t own, int64_t keep);
void route_backward_cpu(const at::Tensor& q, const at::Tensor& a, const at::Tensor& d_h,
                        at::Tensor& dz, int64_t M, int64_t own, double scaling);

#ifdef FEDLEASE_WITH_CUDA
constexpr int64_t kMaxCudaExperts = 32;  // gates live in registers: one array per thread

void route_forward_cuda(const at::Tensor& logits, const at::Tensor& a, at::Tensor& q,
                        at::Tensor& h, int64_t M, int64_t own, int64_t keep);
void route_backward_cuda(const at::Tensor& q, const at::Tensor& a, const at::Tensor& d_h,
                         at::Tensor& dz, int64_t M, int64_t own, double scaling);
#endif

}  // namespace fedlease
