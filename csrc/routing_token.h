// One token's routing, shared by the CPU loops (moe_lora.cpp) and the CUDA kernels
// (routing_cuda.cu): compiled for the host by the C++ compiler and for both by nvcc.
//
// Slot s folds onto expert s when s < M and onto `own` otherwise; gated column j belongs to
// expert j / R. `gate` / `d_gate` are caller-provided scratch of M accumulators.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FEDLEASE_HD __host__ __device__ __forceinline__
#else
#define FEDLEASE_HD inline
#endif

namespace fedlease {

FEDLEASE_HD int64_t fold_slot(int64_t s, int64_t M, int64_t own) { return s < M ? s : own; }

template <typename acc_t>
FEDLEASE_HD acc_t exp_(acc_t v) {
#ifdef __CUDA_ARCH__
  return ::exp(v);
#else
  return std::exp(v);
#endif
}

// q[0..S) := softmax of the `keep` largest logits (ties to the lower slot), zero elsewhere;
// h[j] := a[j] * gate[j / R] with gate = q folded onto the experts.
template <typename scalar_t, typename acc_t>
FEDLEASE_HD void route_forward_token(const acc_t* logits, const scalar_t* a, acc_t* q,
                                     scalar_t* h, acc_t* gate, int64_t S, int64_t M, int64_t R,
                                     int64_t own, int64_t keep) {
  acc_t mx = logits[0];
  for (int64_t s = 1; s < S; ++s) mx = logits[s] > mx ? logits[s] : mx;
  acc_t kept = 0;
  for (int64_t s = 0; s < S; ++s) {
    // slots ranked before s: larger logit, or equal logit and lower index (counted without
    // branches: which slot wins is data, and a mispredicted branch per pair was the CPU's cost)
    int64_t above = 0;
    for (int64_t u = 0; u < s; ++u) above += logits[u] >= logits[s];
    for (int64_t u = s + 1; u < S; ++u) above += logits[u] > logits[s];
    const acc_t e = exp_(logits[s] - mx);
    q[s] = above < keep ? e : acc_t(0);
    kept += q[s];
  }
  for (int64_t e = 0; e < M; ++e) gate[e] = 0;
  for (int64_t s = 0; s < S; ++s) {
    q[s] /= kept;
    gate[fold_slot(s, M, own)] += q[s];
  }
  // expert by expert: each column's gate without dividing its index by R
  for (int64_t e = 0; e < M; ++e)
    for (int64_t j = e * R; j < (e + 1) * R; ++j)
      h[j] = static_cast<scalar_t>(static_cast<acc_t>(a[j]) * gate[e]);
}

// dz[S + j] := scaling * dH[j] * gate[j / R];  dz[s] := q[s] * (d_gate[fold(s)] - <q, d_gate>),
// d_gate[e] = scaling * sum_{j of expert e} dH[j] a[j]: the restricted-softmax backward.
template <typename scalar_t, typename acc_t>
FEDLEASE_HD void route_backward_token(const acc_t* q, const scalar_t* a, const scalar_t* d_h,
                                      scalar_t* dz, acc_t* gate, acc_t* d_gate, int64_t S,
                                      int64_t M, int64_t R, int64_t own, acc_t scaling) {
  for (int64_t e = 0; e < M; ++e) gate[e] = 0;
  for (int64_t s = 0; s < S; ++s) gate[fold_slot(s, M, own)] += q[s];
  for (int64_t e = 0; e < M; ++e) {
    acc_t dg = 0;
    for (int64_t j = e * R; j < (e + 1) * R; ++j) {
      const acc_t dh = scaling * static_cast<acc_t>(d_h[j]);
      dg += dh * static_cast<acc_t>(a[j]);
      dz[S + j] = static_cast<scalar_t>(dh * gate[e]);
    }
    d_gate[e] = dg;
  }
  acc_t dot = 0;
  for (int64_t s = 0; s < S; ++s) dot += q[s] * d_gate[fold_slot(s, M, own)];
  for (int64_t s = 0; s < S; ++s)
    dz[s] = static_cast<scalar_t>(q[s] * (d_gate[fold_slot(s, M, own)] - dot));
}

}  // namespace fedlease
