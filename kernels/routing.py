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
def slot_to_column_onehot(S, M, MR, R, OWN, S_PAD: tl.constexpr, MR_PAD: tl.constexpr):
    """(S_PAD, MR_PAD) float32 matrix: 1 where slot s folds onto the expert owning column j."""
    offs_s = tl.arange(0, S_PAD)
    offs_j = tl.arange(0, MR_PAD)
    fold = tl.where(offs_s < M, offs_s, OWN)
    hit = (fold[:, None] == (offs_j // R)[None, :]) & (offs_s[:, None] < S)
    hit = hit & (offs_j[None, :] < MR)
    return hit.to(tl.float32)


@triton.jit
def restricted_softmax(logits, S, KEEP, S_PAD: tl.constexpr):
    """Softmax over the first ``S`` columns, keep the ``KEEP`` most probable (ties to the lower
    slot), renormalise over the kept ones. ``logits``: (BLOCK_T, S_PAD) float32."""
    offs_s = tl.arange(0, S_PAD)
    valid = offs_s[None, :] < S
    z = tl.where(valid, logits, float("-inf"))
    z = z - tl.max(z, axis=1)[:, None]
    e = tl.where(valid, tl.exp(z), 0.0)
    p = e / tl.sum(e, axis=1)[:, None]
    # rank of slot s = number of slots whose logit beats it (ties: the lower slot wins);
    # a slot is kept when its rank is < KEEP. Logits, not probabilities: equal logits stay equal.
    mine = z[:, :, None]
    other = z[:, None, :]
    s_idx = offs_s[None, :, None]
    o_idx = offs_s[None, None, :]
    beats = (other > mine) | ((other == mine) & (o_idx < s_idx))
    rank = tl.sum(beats.to(tl.int32), axis=2)
    kept = (rank < KEEP) & valid
    q = tl.where(kept, p, 0.0)
    return q / tl.sum(q, axis=1)[:, None]


@triton.jit
def dropout_keep(seed, offs_t, offs_d, D, p_drop):
    """Boolean keep-mask of inverted dropout for x[offs_t, offs_d], a pure function of the seed."""
    rnd = tl.rand(seed, offs_t[:, None] * D + offs_d[None, :])
    return rnd >= p_drop


@triton.jit
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
