"""Pieces shared by the forward and backward kernels: masked tile loads, routing (float32).

Slot ``s`` folds onto expert ``s`` when ``s < M`` and onto ``OWN`` otherwise, which covers every
routing mode: adaptive has ``S = 2M - 1`` slots, top-k and dense have ``S = M`` (no slot folds).
Rank column ``j`` of the stacked adapter belongs to expert ``j // R``.
"""

import triton
import triton.language as tl


@triton.jit
def load_tile(ptr, rows, cols, stride, n_rows, n_cols):
    """Tile ``ptr[rows, cols]`` of a row-major matrix (unit column stride), zero outside
    ``n_rows x n_cols``."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def load_b_tile(ptr, rows, cols, stride_n, stride_m, R, n_rows, n_cols):
    """Tile ``B_cat[rows, cols]`` read in place from the experts' stacked ``B (M, N, R)`` (element
    ``(m, n, k)`` at ``m * stride_m + n * stride_n + k``): column ``j`` of ``B_cat`` is expert
    ``j // R``'s rank ``j % R``. Zero outside ``n_rows x n_cols``."""
    col_offs = (cols // R) * stride_m + cols % R
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride_n + col_offs[None, :], mask=mask, other=0.0)


@triton.jit
def _fold(s, M, OWN):
    """The expert slot ``s`` folds onto."""
    return tl.where(s < M, s, OWN)


@triton.jit
def column(tile, idx, c):
    """Column ``c`` of ``tile`` as a vector (``idx``: the tile's column indices)."""
    return tl.sum(tl.where(idx[None, :] == c, tile, 0.0), axis=1)


@triton.jit
def gate_per_column(q, M, R, OWN, S_PAD: tl.constexpr, MR_PAD: tl.constexpr):
    """(BLOCK_T, MR_PAD): the gate of the expert owning rank column j, i.e. the sum of the slot
    probabilities ``q`` (BLOCK_T, S_PAD) folding onto it. Slot by slot, so that no S x MR or
    T x S x MR intermediate is ever live."""
    offs_s = tl.arange(0, S_PAD)
    expert = tl.arange(0, MR_PAD) // R
    gate = tl.zeros((q.shape[0], MR_PAD), dtype=tl.float32)
    for s in tl.static_range(S_PAD):  # padded slots have q = 0 and add nothing
        q_s = column(q, offs_s, s)
        gate += tl.where((expert == _fold(s, M, OWN))[None, :], q_s[:, None], 0.0)
    return gate


@triton.jit
def sum_columns_per_slot(v, M, R, OWN, S_PAD: tl.constexpr, MR_PAD: tl.constexpr):
    """(BLOCK_T, S_PAD): for each slot s, the sum of ``v`` (BLOCK_T, MR_PAD) over the rank
    columns of the expert s folds onto (the transpose of ``gate_per_column``)."""
    offs_s = tl.arange(0, S_PAD)
    expert = tl.arange(0, MR_PAD) // R
    out = tl.zeros((v.shape[0], S_PAD), dtype=tl.float32)
    for s in tl.static_range(S_PAD):
        v_s = tl.sum(tl.where((expert == _fold(s, M, OWN))[None, :], v, 0.0), axis=1)
        out += tl.where(offs_s[None, :] == s, v_s[:, None], 0.0)
    return out


@triton.jit
def restricted_softmax(logits, S, KEEP, S_PAD: tl.constexpr):
    """Softmax over the first ``S`` columns, keep the ``KEEP`` most probable (ties to the lower
    slot), renormalise over the kept ones. ``logits``: (BLOCK_T, S_PAD) float32."""
    offs_s = tl.arange(0, S_PAD)
    valid = offs_s[None, :] < S
    z = tl.where(valid, logits, float("-inf"))
    z = z - tl.max(z, axis=1)[:, None]
    # rank of slot s = number of slots whose logit beats it (ties: the lower slot wins);
    # a slot is kept when its rank is < KEEP. Logits, not probabilities: equal logits stay equal.
    # One slot u at a time: only (BLOCK_T, S_PAD) tiles are live.
    rank = tl.zeros(z.shape, dtype=tl.int32)
    for u in tl.static_range(S_PAD):
        z_u = column(z, offs_s, u)[:, None]  # -inf for a padded slot: it beats nothing
        beats = (z_u > z) | ((z_u == z) & (u < offs_s[None, :]))
        rank += beats.to(tl.int32)
    kept = (rank < KEEP) & valid
    e = tl.where(kept, tl.exp(z), 0.0)
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def dropout_keep(seed, offs_t, offs_d, D, p_drop):
    """Boolean keep-mask of inverted dropout for x[offs_t, offs_d], a pure function of the seed."""
    rnd = tl.rand(seed, offs_t[:, None] * D + offs_d[None, :])
    return rnd >= p_drop


@triton.jit(do_not_specialize=["T", "seed"])  # one compiled kernel for any token count, seed
def dropout_mask_kernel(out_ptr, T, D, seed, p_drop, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Writes the multiplier ``keep / (1 - p)`` that the kernels apply, for tests and debugging."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    keep = dropout_keep(seed, offs_t, offs_d, D, p_drop)
    mask = (offs_t[:, None] < T) & (offs_d[None, :] < D)
    tl.store(
        out_ptr + offs_t[:, None] * D + offs_d[None, :],
        tl.where(keep, 1.0 / (1.0 - p_drop), 0.0),
        mask=mask,
    )
