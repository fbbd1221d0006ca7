"""Backward kernels of the MoE-LoRA op.

1. ``grad_route``: one program per block of tokens reads dy once: dH = scaling * dy @ B_cat
   (T, MR); the gate gradient folded back onto slots dq[t, s] = sum_j dH a [fold(s) = expert(j)];
   the restricted-softmax backward dlogits = q * (dq - <q, dq>); and da = gate * dH.
2. ``grad_input_weights``: one pass over x. Programs own a column block of D and a contiguous
   range of tokens (a split of T). Each computes its tiles of dx = dlogits @ router + mask *
   (da @ A_cat) and accumulates the weight gradients d_router = dlogits^T x and
   dA_cat = da^T dropout(x) over its tokens, then writes one float32 partial per split; the
   partials are summed afterwards. No atomics: the result is deterministic, and the partial
   buffers stay small (SPLIT x (S + MR) x D).

dB_cat = scaling * dy^T h is a plain (N x T) @ (T x MR) GEMM left to the vendor BLAS.
"""

import triton
import triton.language as tl

from .routing import dropout_keep, load_tile, slot_to_column_onehot


@triton.jit
def grad_route_kernel(
    dy_ptr, b_cat_ptr, q_ptr, a_ptr, dlogits_ptr, da_ptr,
    T, N, S, M, MR, R, OWN, scaling,
    stride_dyt, stride_bn,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, S_PAD: tl.constexpr, MR_PAD: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, S_PAD)
    offs_j = tl.arange(0, MR_PAD)
    t_ok = offs_t < T
    acc = tl.zeros((BLOCK_T, MR_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = load_tile(dy_ptr, offs_t, offs_n, stride_dyt, T, N)
        b = load_tile(b_cat_ptr, offs_n, offs_j, stride_bn, N, MR)
        if UPCAST:
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(dy, b, input_precision=DOT_PRECISION)
    d_h = acc * scaling

    s_mask = t_ok[:, None] & (offs_s[None, :] < S)
    j_mask = t_ok[:, None] & (offs_j[None, :] < MR)
    q = load_tile(q_ptr, offs_t, offs_s, S, T, S)
    a = load_tile(a_ptr, offs_t, offs_j, MR, T, MR)
    onehot = slot_to_column_onehot(S, M, MR, R, OWN, S_PAD, MR_PAD)
    gate_per_column = tl.dot(q, onehot, input_precision="ieee")
    d_q = tl.dot(d_h * a, tl.trans(onehot), input_precision="ieee")
    d_logits = q * (d_q - tl.sum(q * d_q, axis=1)[:, None])
    d_a = d_h * gate_per_column
    tl.store(dlogits_ptr + offs_t[:, None] * S + offs_s[None, :], d_logits, mask=s_mask)
    tl.store(da_ptr + offs_t[:, None] * MR + offs_j[None, :], d_a, mask=j_mask)


@triton.jit
def grad_input_weights_kernel(
    x_ptr, router_ptr, a_cat_ptr, dlogits_ptr, da_ptr, dx_ptr, dw_router_ptr, dw_a_ptr,
    T, D, S, MR, tokens_per_split,
    stride_xt, stride_rs, stride_am, stride_dxt,
    seed, p_drop,
    HAS_DROPOUT: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DW: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, S_PAD: tl.constexpr, MR_PAD: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, S_PAD)
    offs_j = tl.arange(0, MR_PAD)
    d_ok = offs_d < D
    # This program's slice of the weights stays in registers for the whole token loop.
    w_r = load_tile(router_ptr, offs_s, offs_d, stride_rs, S, D).to(tl.float32)
    w_a = load_tile(a_cat_ptr, offs_j, offs_d, stride_am, MR, D).to(tl.float32)
    acc_r = tl.zeros((S_PAD, BLOCK_D), dtype=tl.float32)
    acc_a = tl.zeros((MR_PAD, BLOCK_D), dtype=tl.float32)
    t_begin = split * tokens_per_split
    for t0 in range(t_begin, t_begin + tokens_per_split, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        g_r = load_tile(dlogits_ptr, offs_t, offs_s, S, T, S)
        g_a = load_tile(da_ptr, offs_t, offs_j, MR, T, MR)
        xd_mask = t_ok[:, None] & d_ok[None, :]
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_t, offs_d, D, p_drop)
            inv_keep = tl.where(keep, 1.0 / (1.0 - p_drop), 0.0)
        if NEED_DX:
            dx = tl.dot(g_r, w_r, input_precision="ieee")
            dx_e = tl.dot(g_a, w_a, input_precision="ieee")
            if HAS_DROPOUT:
                dx_e = dx_e * inv_keep
            dx = dx + dx_e
            tl.store(
                dx_ptr + offs_t[:, None] * stride_dxt + offs_d[None, :],
                dx.to(dx_ptr.dtype.element_ty),
                mask=xd_mask,
            )
        if NEED_DW:
            x = load_tile(x_ptr, offs_t, offs_d, stride_xt, T, D).to(tl.float32)
            acc_r += tl.dot(tl.trans(g_r), x, input_precision="ieee")
            if HAS_DROPOUT:
                x = x * inv_keep
            acc_a += tl.dot(tl.trans(g_a), x, input_precision="ieee")
    if NEED_DW:
        r_ptrs = dw_router_ptr + split * S * D + offs_s[:, None] * D + offs_d[None, :]
        tl.store(r_ptrs, acc_r, mask=(offs_s[:, None] < S) & d_ok[None, :])
        a_ptrs = dw_a_ptr + split * MR * D + offs_j[:, None] * D + offs_d[None, :]
        tl.store(a_ptrs, acc_a, mask=(offs_j[:, None] < MR) & d_ok[None, :])


__all__ = ["grad_input_weights_kernel", "grad_route_kernel", "triton"]
