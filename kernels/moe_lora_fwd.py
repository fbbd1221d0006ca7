"""Forward kernels of the MoE-LoRA op: shrink + route, then expand into the base output.

Shapes, per client c of C (the clients' tokens come one client after another, T each): x (C*T, D),
router (C, S, D), A_cat (C, MR, D) with MR = M * R, B (C, M, N, R): the experts' stacked B, read
in place as B_cat (N, MR) (column e * R + k: expert e's rank k), never copied; ``own`` (C,) int32:
each client's own expert. One client is the case C = 1. The last grid axis (of the expand kernel;
the second of shrink_route) is the client: a program's tokens all belong to one client and meet
only that client's router and experts.

1. ``shrink_route``: one program per block of tokens reads each x tile once and computes the
   router logits (S) and every expert's projection a = A_cat x (MR) together; its epilogue routes
   in float32 (softmax, top-KEEP slots, renormalise, fold slots onto experts) and writes the slot
   probabilities q (T, S), the projection a (T, MR, float32) and h = gate * a (T, MR).
   Dropout on the experts' input is drawn in-kernel from a seed, keyed by the token's row among
   all clients' rows (so every client gets its own mask); the router sees x undropped.
2. ``expand``: y = base + scaling * h @ B_cat^T (+ bias). ``base`` is read from its own tensor,
   so the op's output needs no copy of it; without a base the kernel only writes, and the frozen
   base GEMM then accumulates onto y (``addmm_`` with beta = 1, in cuBLAS's epilogue).
"""

import triton
import triton.language as tl

from .routing import dropout_keep, gate_per_column, load_b_tile, load_tile, restricted_softmax


@triton.jit(do_not_specialize=["T", "seed"])  # one compiled kernel for any token count, seed
def shrink_route_kernel(
    x_ptr, router_ptr, a_cat_ptr, own_ptr, q_ptr, a_ptr, h_ptr,
    T, D, S, M, MR, R, KEEP,
    stride_xt, stride_rc, stride_rs, stride_ac, stride_am,
    seed, p_drop,
    HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, S_PAD: tl.constexpr, MR_PAD: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    client = tl.program_id(1)
    c = client.to(tl.int64)
    x_ptr += c * T * stride_xt
    router_ptr += c * stride_rc
    a_cat_ptr += c * stride_ac
    q_ptr += c * T * S
    a_ptr += c * T * MR
    h_ptr += c * T * MR
    OWN = tl.load(own_ptr + client)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, S_PAD)
    offs_j = tl.arange(0, MR_PAD)
    t_ok = offs_t < T
    acc_logits = tl.zeros((BLOCK_T, S_PAD), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_T, MR_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = load_tile(x_ptr, offs_t, offs_d, stride_xt, T, D)
        w_r = load_tile(router_ptr, offs_s, offs_d, stride_rs, S, D)
        w_a = load_tile(a_cat_ptr, offs_j, offs_d, stride_am, MR, D)
        if UPCAST:
            x = x.to(tl.float32)
            w_r = w_r.to(tl.float32)
            w_a = w_a.to(tl.float32)
        acc_logits += tl.dot(x, tl.trans(w_r), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, client * T + offs_t, offs_d, D, p_drop)
            x_e = tl.where(keep, x.to(tl.float32) / (1.0 - p_drop), 0.0).to(x.dtype)
        else:
            x_e = x
        acc_a += tl.dot(x_e, tl.trans(w_a), input_precision=DOT_PRECISION)

    q = restricted_softmax(acc_logits, S, KEEP, S_PAD)
    h = acc_a * gate_per_column(q, M, R, OWN, S_PAD, MR_PAD)

    s_mask = t_ok[:, None] & (offs_s[None, :] < S)
    j_mask = t_ok[:, None] & (offs_j[None, :] < MR)
    tl.store(q_ptr + offs_t[:, None] * S + offs_s[None, :], q, mask=s_mask)
    tl.store(a_ptr + offs_t[:, None] * MR + offs_j[None, :], acc_a, mask=j_mask)
    tl.store(
        h_ptr + offs_t[:, None] * MR + offs_j[None, :], h.to(h_ptr.dtype.element_ty), mask=j_mask
    )


@triton.jit(do_not_specialize=["T"])  # one compiled kernel for any token count
def expand_kernel(
    h_ptr, b_ptr, base_ptr, bias_ptr, y_ptr,
    T, N, MR, R, scaling,
    stride_bc, stride_bn, stride_bm, stride_baset, stride_yt,
    HAS_BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, MR_PAD: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    c = tl.program_id(2).to(tl.int64)  # the client
    h_ptr += c * T * MR
    b_ptr += c * stride_bc
    base_ptr += c * T * stride_baset
    y_ptr += c * T * stride_yt
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, MR_PAD)
    t_ok = offs_t < T
    n_ok = offs_n < N
    h = load_tile(h_ptr, offs_t, offs_j, MR, T, MR)
    b_t = tl.trans(load_b_tile(b_ptr, offs_n, offs_j, stride_bn, stride_bm, R, N, MR))
    if UPCAST:
        h = h.to(tl.float32)
        b_t = b_t.to(tl.float32)
    y = tl.dot(h, b_t, input_precision=DOT_PRECISION) * scaling
    mask = t_ok[:, None] & n_ok[None, :]
    if HAS_BASE:
        base_ptrs = base_ptr + offs_t[:, None] * stride_baset + offs_n[None, :]
        y += tl.load(base_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_t[:, None] * stride_yt + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


__all__ = ["expand_kernel", "shrink_route_kernel", "triton"]
