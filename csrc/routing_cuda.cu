// CUDA routing passes (see routing.h): one thread per token. S <= 2M-1 slots and M*R gated
// columns per token are small, so a token's softmax, top-M and fold stay in registers; the
// matrix work around them is cuBLAS through ATen in moe_lora.cpp.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "routing.h"

namespace fedlease {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ int64_t fold_slot(int64_t s, int64_t M, int64_t own) {
  return s < M ? s : own;
}

template <typename scalar_t, typename acc_t>
__global__ void route_forward_kernel(const acc_t* __restrict__ logits, int64_t ls,
                                     const scalar_t* __restrict__ a, int64_t as,
                                     acc_t* __restrict__ q, scalar_t* __restrict__ h, int64_t T,
                                     int64_t S, int64_t M, int64_t R, int64_t own, int64_t keep) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const acc_t* lt = logits + t * ls;
  acc_t* qt = q + t * S;
  acc_t mx = lt[0];
  for (int64_t s = 1; s < S; ++s) mx = lt[s] > mx ? lt[s] : mx;
  acc_t sum = 0;
  for (int64_t s = 0; s < S; ++s) {
    qt[s] = exp(lt[s] - mx);
    sum += qt[s];
  }
  acc_t kept = 0;
  for (int64_t s = 0; s < S; ++s) {
    int64_t above = 0;  // slots ranked before s: larger logit, or equal logit and lower index
    for (int64_t u = 0; u < S; ++u) above += (lt[u] > lt[s]) || (lt[u] == lt[s] && u < s);
    if (above < keep) {
      qt[s] /= sum;
      kept += qt[s];
    } else {
      qt[s] = 0;
    }
  }
  acc_t gate[kMaxCudaExperts];
  for (int64_t e = 0; e < M; ++e) gate[e] = 0;
  for (int64_t s = 0; s < S; ++s) {
    qt[s] /= kept;
    gate[fold_slot(s, M, own)] += qt[s];
  }
  const scalar_t* at_ = a + t * as;
  scalar_t* ht = h + t * M * R;
  for (int64_t j = 0; j < M * R; ++j)
    ht[j] = static_cast<scalar_t>(static_cast<acc_t>(at_[j]) * gate[j / R]);
}

template <typename scalar_t, typename acc_t>
__global__ void route_backward_kernel(const acc_t* __restrict__ q, const scalar_t* __restrict__ a,
                                      int64_t as, const scalar_t* __restrict__ d_h,
                                      scalar_t* __restrict__ dz, int64_t T, int64_t S, int64_t M,
                                      int64_t R, int64_t own, acc_t scaling) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const int64_t MR = M * R;
  const acc_t* qt = q + t * S;
  const scalar_t* at_ = a + t * as;
  const scalar_t* dht = d_h + t * MR;
  scalar_t* dzt = dz + t * (S + MR);
  acc_t gate[kMaxCudaExperts], d_gate[kMaxCudaExperts];
  for (int64_t e = 0; e < M; ++e) gate[e] = d_gate[e] = 0;
  for (int64_t s = 0; s < S; ++s) gate[fold_slot(s, M, own)] += qt[s];
  for (int64_t j = 0; j < MR; ++j) {
    const acc_t dh = scaling * static_cast<acc_t>(dht[j]);
    d_gate[j / R] += dh * static_cast<acc_t>(at_[j]);
    dzt[S + j] = static_cast<scalar_t>(dh * gate[j / R]);
  }
  acc_t dot = 0;
  for (int64_t s = 0; s < S; ++s) dot += qt[s] * d_gate[fold_slot(s, M, own)];
  for (int64_t s = 0; s < S; ++s)
    dzt[s] = static_cast<scalar_t>(qt[s] * (d_gate[fold_slot(s, M, own)] - dot));
}

int64_t blocks_for(int64_t T) { return (T + kThreads - 1) / kThreads; }

}  // namespace

void route_forward_cuda(const at::Tensor& logits, const at::Tensor& a, at::Tensor& q,
                        at::Tensor& h, int64_t M, int64_t own, int64_t keep) {
  TORCH_CHECK(M <= kMaxCudaExperts, "fedlease CUDA routing supports up to ", kMaxCudaExperts,
              " experts, got ", M);
  const int64_t T = a.size(0), S = q.size(1), R = h.size(1) / M;
  if (T == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "route_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    route_forward_kernel<scalar_t, acc_t><<<blocks_for(T), kThreads, 0, stream>>>(
        logits.const_data_ptr<acc_t>(), logits.stride(0), a.const_data_ptr<scalar_t>(),
        a.stride(0), q.data_ptr<acc_t>(), h.data_ptr<scalar_t>(), T, S, M, R, own, keep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void route_backward_cuda(const at::Tensor& q, const at::Tensor& a, const at::Tensor& d_h,
                         at::Tensor& dz, int64_t M, int64_t own, double scaling) {
  TORCH_CHECK(M <= kMaxCudaExperts, "fedlease CUDA routing supports up to ", kMaxCudaExperts,
              " experts, got ", M);
  const int64_t T = a.size(0), S = q.size(1), R = d_h.size(1) / M;
  if (T == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "route_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    route_backward_kernel<scalar_t, acc_t><<<blocks_for(T), kThreads, 0, stream>>>(
        q.const_data_ptr<acc_t>(), a.const_data_ptr<scalar_t>(), a.stride(0),
        d_h.const_data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(), T, S, M, R, own,
        static_cast<acc_t>(scaling));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fedlease
