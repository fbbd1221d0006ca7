"""Block sizes and grids of the MoE-LoRA kernels, chosen from the problem's shape.

Under Triton's interpreter every program costs milliseconds, so blocks are large there; on a GPU
they are chosen to keep each program's tiles in registers (at most 128 x 64 float32 accumulator
elements per program) and to launch enough programs to fill the device.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ForwardLaunch:
    block_t: int
    block_d: int
    block_n: int


@dataclass(frozen=True)
class BackwardLaunch:
    block_t: int
    block_n: int  # grad_route: columns of dy per step
    block_d: int  # grad_input: columns of dx per step
    cols_per_program: int  # grad_input: columns of dx per program
    w_block_k: int  # grad_weights: rows of [router; A_cat] per program
    w_block_d: int  # grad_weights: columns per program
    tokens_per_split: int  # grad_weights: tokens per program (a multiple of block_t)
    splits: int


def forward_launch(interpreter: bool) -> ForwardLaunch:
    if interpreter:
        return ForwardLaunch(block_t=64, block_d=64, block_n=64)
    return ForwardLaunch(block_t=64, block_d=64, block_n=128)


def backward_launch(tokens: int, d_in: int, k: int, interpreter: bool) -> BackwardLaunch:
    """Launch shape of the three backward passes for ``tokens`` x ``d_in`` inputs and
    ``k = S + M*r`` gradient columns per token."""
    block_t = 64
    target = TARGET_PROGRAMS["interpreter" if interpreter else "gpu"]
    t_blocks = cdiv(tokens, block_t)
    # grad_input: one program per token block and range of columns; split the columns only
    # when there are too few token blocks to fill the device.
    block_d = 64
    d_blocks = cdiv(d_in, block_d)
    col_groups = min(d_blocks, max(1, target // t_blocks))
    cols_per_program = cdiv(d_blocks, col_groups) * block_d
    # grad_weights: the float32 accumulator is w_block_k x w_block_d <= 128 x 64 (or 64 x 128).
    w_block_k = min(128, pow2_at_least_16(k))
    w_block_d = 64 if interpreter else 8192 // w_block_k
    tiles = cdiv(d_in, w_block_d) * cdiv(k, w_block_k)
    splits = min(t_blocks, MAX_SPLITS, max(1, target // tiles))
    tokens_per_split = cdiv(t_blocks, splits) * block_t
    splits = cdiv(tokens, tokens_per_split)
    return BackwardLaunch(block_t, 64, block_d, cols_per_program, w_block_k, w_block_d,
                          tokens_per_split, splits)  # fmt: skip
