// CUDA routing passes (see routing.h): one thread per token running routing_token.h, the same
// code as the CPU loops. S <= 2M-1 slots and M gates per token are small, so a token's softmax,
// top-M and fold stay in registers; the matrix work around them is cuBLAS through ATen in
// moe_lora.cpp.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "routing.h"
#include "routing_token.h"

namespace fedlease {
namespace {

constexpr int kThreads = 128;

template <typename scalar_t, typename acc_t>
__global__ void route_forward_kernel(const acc_t* __restrict__ logits, int64_t ls,
                                     const scalar_t* __restrict__ a, int64_t as,
                                     acc_t* __restrict__ q, scalar_t* __restrict__ h, int64_t T,
                                     int64_t S, int64_t M, int64_t R, int64_t own, int64_t keep) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  acc_t gate[kMaxCudaExperts];
  route_forward_token(logits + t * ls, a + t * as, q + t * S, h + t * M * R, gate, S, M, R, own,
                      keep);
}

template <typename scalar_t, typename acc_t>
__global__ void route_backward_kernel(const acc_t* __restrict__ q, const scalar_t* __restrict__ a,
                                      int64_t as, const scalar_t* __restrict__ d_h,
                                      scalar_t* __restrict__ dz, int64_t T, int64_t S, int64_t M,
                                      int64_t R, int64_t own, acc_t scaling) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  acc_t gate[kMaxCudaExperts], d_gate[kMaxCudaExperts];
  route_backward_token(q + t * S, a + t * as, d_h + t * M * R, dz + t * (S + M * R), gate, d_gate,
                       S, M, R, own, scaling);
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
