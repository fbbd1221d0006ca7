"""Launch plans of the MoE-LoRA kernels: block sizes, warps and grids from the problem's shape.

Every kernel launch takes its meta-parameters from here (``plan.meta[kernel]``: block sizes,
padded widths, ``num_warps``), and so does ``benchmarks/kernel_resources.py``, which compiles the
kernels for a GPU target and reports their registers and spills without needing a GPU. On a GPU
the blocks keep every kernel's live tiles in registers (no spills, checked by that script for
M*r up to 128) and launch enough programs to fill the device; under Triton's interpreter, where
every program costs milliseconds, blocks are large and programs few.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import triton

# Programs a launch should have to fill a GPU (a few per streaming multiprocessor); under the
# interpreter a handful, enough that the split and column-range paths run in tests.
TARGET_PROGRAMS = {"gpu": 512, "interpreter": 4}
MAX_SPLITS = 64  # token splits of the weight-gradient pass (float32 partials, summed after)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def pow2_at_least_16(n: int) -> int:
    """``tl.arange`` sizes must be powers of two; ``tl.dot`` needs dimensions of at least 16."""
    return max(16, triton.next_power_of_2(n))


def _routing_block_t(mr_pad: int, interpreter: bool, wide: bool) -> int:
    """Tokens per program of the kernels that route (several BLOCK_T x MR_PAD float32 tiles)."""
    if interpreter:
        return 64
    return 64 if mr_pad <= 32 and not wide else 32


def _expand_block_n(mr_pad: int, interpreter: bool, wide: bool) -> int:
    """Output columns per expand program: float32 ``ieee`` dots hold both operands in registers,
    so at M*r = 128 their column block halves (Triton 3.6's ptxas spilled 208 bytes at 64)."""
    if interpreter:
        return 64
    if wide:
        return 64 if mr_pad <= 64 else 32
    return 128


@dataclass(frozen=True)
class ForwardPlan:
    meta: dict[str, dict] = field(default_factory=dict)  # kernel name -> meta-parameters


@dataclass(frozen=True)
class BackwardPlan:
    cols_per_program: int  # grad_input: columns of dx per program (a multiple of BLOCK_D)
    tokens_per_split: int  # grad_weights: tokens per program (a multiple of BLOCK_T)
    splits: int
    meta: dict[str, dict] = field(default_factory=dict)


@functools.lru_cache(maxsize=256)  # plans are pure functions of the shape; built once each
def forward_plan(slots: int, mr: int, interpreter: bool, wide: bool = False) -> ForwardPlan:
    """``wide``: float32 operands (``ieee`` dots on CUDA cores, which hold their operands in
    registers): half-width column blocks or twice the warps, where 16-bit tiles would spill."""
    s_pad, mr_pad = pow2_at_least_16(slots), pow2_at_least_16(mr)
    wide = wide and not interpreter
    block_t = _routing_block_t(mr_pad, interpreter, wide)
    return ForwardPlan(
        {
            "shrink_route": dict(BLOCK_T=block_t, BLOCK_D=32 if wide else 64, S_PAD=s_pad,
                                 MR_PAD=mr_pad, num_warps=8 if wide else 4),
            "expand": dict(BLOCK_T=32 if wide else 64,
                           BLOCK_N=_expand_block_n(mr_pad, interpreter, wide), MR_PAD=mr_pad,
                           num_warps=8 if wide else 4),
        }
    )  # fmt: skip


@functools.lru_cache(maxsize=256)
def backward_plan(
    tokens: int,
    d_in: int,
    slots: int,
    mr: int,
    interpreter: bool,
    wide: bool = False,
    clients: int = 1,
) -> BackwardPlan:
    """Plan of the three backward passes for ``clients`` x ``tokens`` x ``d_in`` inputs (each
    client's tokens apart), ``slots`` router outputs and ``mr = M * r`` rank columns (``wide``:
    float32 operands, as in ``forward_plan``). Column ranges and token splits are per client; the
    clients multiply the programs, so the more clients, the fewer splits the device needs."""
    wide = wide and not interpreter
    s_pad, mr_pad = pow2_at_least_16(slots), pow2_at_least_16(mr)
    k = slots + mr
    target = TARGET_PROGRAMS["interpreter" if interpreter else "gpu"]
    route_t = _routing_block_t(mr_pad, interpreter, wide)
    # grad_input: one program per token block and range of columns; the columns are split only
    # when there are too few token blocks to fill the device.
    input_t, block_d = (32, 32) if wide else (64, 64)
    t_blocks = max(1, clients * cdiv(tokens, input_t))  # (no tokens: nothing to launch)
    d_blocks = cdiv(d_in, block_d)
    col_groups = min(d_blocks, max(1, target // t_blocks))
    cols_per_program = cdiv(d_blocks, col_groups) * block_d
    # grad_weights: a float32 accumulator of at most 128 x 128 over 8 warps; 32 tokens a step
    # (the in-kernel dropout draws a BLOCK_T x BLOCK_D tile of random numbers).
    w_block_k = min(128, pow2_at_least_16(k))
    w_block_d = 64 if interpreter or wide else 128
    w_t = 64 if interpreter else 32
    tiles = clients * cdiv(d_in, w_block_d) * cdiv(k, w_block_k)
    w_blocks = max(1, cdiv(tokens, w_t))
    splits = min(w_blocks, MAX_SPLITS, max(1, target // tiles))
    tokens_per_split = cdiv(w_blocks, splits) * w_t
    splits = cdiv(tokens, tokens_per_split)
    # float32 operands at M*r >= 64 on 4 warps: Triton 3.6's ptxas gave grad_input a 3 KB stack
    # frame at M*r = 128 and grad_route 8 bytes at 64; on 8 warps neither spills (3.6 and 3.9).
    wide_warps = 8 if wide and mr_pad >= 64 else 4
    meta = {
        "grad_route": dict(BLOCK_T=route_t, BLOCK_N=64, S_PAD=s_pad, MR_PAD=mr_pad,
                           num_warps=wide_warps),
        "grad_input": dict(BLOCK_T=input_t, BLOCK_D=block_d, S_PAD=s_pad, MR_PAD=mr_pad,
                           num_warps=wide_warps),
        "grad_weights": dict(BLOCK_T=w_t, BLOCK_D=w_block_d, BLOCK_K=w_block_k, num_warps=8),
    }  # fmt: skip
    return BackwardPlan(cols_per_program, tokens_per_split, splits, meta)
