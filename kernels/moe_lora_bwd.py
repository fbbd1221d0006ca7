"""Backward kernels of the MoE-LoRA op, three passes that each hold only small tiles.

Shapes as in ``moe_lora_fwd`` (C clients of T tokens each, their rows one client after another):
x (C*T, D), dy (C*T, N), router (C, S, D), A_cat (C, MR, D), B (C, M, N, R) read in place as
B_cat (N, MR) (``routing.load_b_tile``), own (C,); K = S + MR, and
``dz (C*T, K)`` float32 holds ``[dlogits, da]`` per token: the gradients of the router logits and of
the experts' projections ``a = A_cat dropout(x)``.

1. ``grad_route``: one program per block of tokens reads dy once: dH = scaling * dy @ B_cat
   (T, MR); the gate gradient folded back onto slots dq[t, s] = sum_j dH a [fold(s) = expert(j)];
   the restricted-softmax backward dlogits = q * (dq - <q, dq>); and da = gate * dH.
2. ``grad_input``: dx = dlogits @ router + mask * (da @ A_cat). A program owns a block of tokens
   and a range of columns of D; x is not read. ``ACCUMULATE`` adds it onto the dx already in
   memory (the frozen base's dy W, when cuBLAS wrote that first).
3. ``grad_weights``: d[router; A_cat] = dz^T [x, dropout(x)], a (K x T) @ (T x D) product. A
   program owns a block of at most 128 rows of K, a block of columns of D and a contiguous range
   of one client's tokens (a split of T), accumulates over its tokens in registers (at most
   128 x 128 float32 over 8 warps) and writes one float32 partial per client and split, its
   router rows and its A_cat rows each to a tensor of their own (so each gradient is contiguous
   in its parameter's layout); the partials are summed afterwards.
   No atomics: the result is deterministic, and the partial buffers stay small (SPLITS x C x K x D).
   With one split the result is stored in the weights' dtype directly (no partial to sum).

Every program works for one client (the last grid axis; with the token splits on the third axis
of ``grad_weights``). Every kernel's tiles fit in registers for M*r up to 128 (no spills on sm_90,
checked by ``benchmarks/kernel_resources.py`` and its test).

Matrix products run on the input dtype (tensor cores for 16-bit inputs) with float32
accumulation; ``UPCAST`` (float32 inputs, and the interpreter, whose bfloat16 math is wrong)
computes them in float32 instead. dB_cat = scaling * dy^T h is left to the vendor BLAS.
"""

import triton
import triton.language as tl

from .routing import dropout_keep, gate_per_column, load_b_tile, load_tile, sum_columns_per_slot


@triton.jit(do_not_specialize=["T"])  # one compiled kernel for any token count
def grad_route_kernel(
    dy_ptr, b_ptr, own_ptr, q_ptr, a_ptr, dz_ptr,
    T, N, S, M, MR, R, scaling,
    stride_dyt, stride_bc, stride_bn, stride_bm,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, S_PAD: tl.constexpr, MR_PAD: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    client = tl.program_id(1)
    c = client.to(tl.int64)
    k = S + MR
    dy_ptr += c * T * stride_dyt
    b_ptr += c * stride_bc
    q_ptr += c * T * S
    a_ptr += c * T * MR
    dz_ptr += c * T * k
    OWN = tl.load(own_ptr + client)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, S_PAD)
    offs_j = tl.arange(0, MR_PAD)
    t_ok = offs_t < T
    acc = tl.zeros((BLOCK_T, MR_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = load_tile(dy_ptr, offs_t, offs_n, stride_dyt, T, N)
        b = load_b_tile(b_ptr, offs_n, offs_j, stride_bn, stride_bm, R, N, MR)
        if UPCAST:
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(dy, b, input_precision=DOT_PRECISION)
    d_h = acc * scaling

    q = load_tile(q_ptr, offs_t, offs_s, S, T, S)
    a = load_tile(a_ptr, offs_t, offs_j, MR, T, MR)
    d_q = sum_columns_per_slot(d_h * a, M, R, OWN, S_PAD, MR_PAD)
    d_logits = q * (d_q - tl.sum(q * d_q, axis=1)[:, None])
    d_a = d_h * gate_per_column(q, M, R, OWN, S_PAD, MR_PAD)
    s_mask = t_ok[:, None] & (offs_s[None, :] < S)
    j_mask = t_ok[:, None] & (offs_j[None, :] < MR)
    tl.store(dz_ptr + offs_t[:, None] * k + offs_s[None, :], d_logits, mask=s_mask)
    tl.store(dz_ptr + offs_t[:, None] * k + S + offs_j[None, :], d_a, mask=j_mask)


@triton.jit(do_not_specialize=["T", "seed"])  # one compiled kernel for any token count, seed
def grad_input_kernel(
    dz_ptr, router_ptr, a_cat_ptr, dx_ptr,
    T, D, S, MR, cols_per_program,
    stride_rc, stride_rs, stride_ac, stride_am, stride_dxt,
    seed, p_drop,
    HAS_DROPOUT: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, S_PAD: tl.constexpr, MR_PAD: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    client = tl.program_id(2)
    c = client.to(tl.int64)
    k = S + MR
    dz_ptr += c * T * k
    router_ptr += c * stride_rc
    a_cat_ptr += c * stride_ac
    dx_ptr += c * T * stride_dxt
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, S_PAD)
    offs_j = tl.arange(0, MR_PAD)
    t_ok = offs_t < T
    # This block's rows of dz, loaded once for all its columns of dx.
    g_r = load_tile(dz_ptr, offs_t, offs_s, k, T, S)
    g_a = load_tile(dz_ptr + S, offs_t, offs_j, k, T, MR)
    if not UPCAST:
        g_r = g_r.to(dx_ptr.dtype.element_ty)
        g_a = g_a.to(dx_ptr.dtype.element_ty)
    d_begin = pid_d * cols_per_program
    for d0 in range(d_begin, d_begin + cols_per_program, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        w_r = load_tile(router_ptr, offs_s, offs_d, stride_rs, S, D)
        w_a = load_tile(a_cat_ptr, offs_j, offs_d, stride_am, MR, D)
        if UPCAST:
            w_r = w_r.to(tl.float32)
            w_a = w_a.to(tl.float32)
        dx_e = tl.dot(g_a, w_a, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, client * T + offs_t, offs_d, D, p_drop)
            dx_e = tl.where(keep, dx_e / (1.0 - p_drop), 0.0)
        dx = tl.dot(g_r, w_r, acc=dx_e, input_precision=DOT_PRECISION)
        dx_ptrs = dx_ptr + offs_t[:, None] * stride_dxt + offs_d[None, :]
        dx_mask = t_ok[:, None] & (offs_d[None, :] < D)
        if ACCUMULATE:  # onto the frozen base's dx, written before this kernel
            dx += tl.load(dx_ptrs, mask=dx_mask, other=0.0).to(tl.float32)
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=dx_mask)


@triton.jit(do_not_specialize=["T", "seed"])  # one compiled kernel for any token count, seed
def grad_weights_kernel(
    dz_ptr, x_ptr, d_router_ptr, d_a_ptr,
    T, D, S, K, tokens_per_split, C,
    stride_xt,
    seed, p_drop,
    HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    client = tl.program_id(2) % C  # the third axis: split * C + client (the partials' order)
    split = tl.program_id(2) // C
    c = client.to(tl.int64)
    dz_ptr += c * T * K
    x_ptr += c * T * stride_xt
    part = tl.program_id(2).to(tl.int64)
    d_router_ptr += part * S * D
    d_a_ptr += part * (K - S) * D
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    is_router_row = offs_k < S
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    t_begin = split * tokens_per_split
    for t0 in range(t_begin, t_begin + tokens_per_split, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        g = tl.trans(load_tile(dz_ptr, offs_t, offs_k, K, T, K))  # (BLOCK_K, BLOCK_T)
        x = load_tile(x_ptr, offs_t, offs_d, stride_xt, T, D)
        if UPCAST:
            x = x.to(tl.float32)
        else:
            g = g.to(x.dtype)
        if HAS_DROPOUT:  # the router rows see x, the expert rows dropout(x)
            keep = dropout_keep(seed, client * T + offs_t, offs_d, D, p_drop)
            x_e = tl.where(keep, x.to(tl.float32) / (1.0 - p_drop), 0.0).to(x.dtype)
            zero = tl.zeros_like(g)
            acc = tl.dot(tl.where(is_router_row[:, None], g, zero), x, acc=acc,
                         input_precision=DOT_PRECISION)  # fmt: skip
            acc = tl.dot(tl.where(is_router_row[:, None], zero, g), x_e, acc=acc,
                         input_precision=DOT_PRECISION)  # fmt: skip
        else:
            acc = tl.dot(g, x, acc=acc, input_precision=DOT_PRECISION)
    d_ok = offs_d[None, :] < D
    router_ptrs = d_router_ptr + offs_k[:, None] * D + offs_d[None, :]
    tl.store(router_ptrs, acc.to(d_router_ptr.dtype.element_ty), mask=is_router_row[:, None] & d_ok)
    a_ptrs = d_a_ptr + (offs_k[:, None] - S) * D + offs_d[None, :]
    a_rows = (offs_k[:, None] >= S) & (offs_k[:, None] < K)
    tl.store(a_ptrs, acc.to(d_a_ptr.dtype.element_ty), mask=a_rows & d_ok)


__all__ = ["grad_input_kernel", "grad_route_kernel", "grad_weights_kernel", "triton"]
