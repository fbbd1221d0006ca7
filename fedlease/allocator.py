"""Keep freed memory in the process instead of handing it back to the kernel after every step.

torch's CPU tensors come from glibc's malloc, which unmaps large freed blocks and trims the
heap's free top. A training step frees its activations at the end of the backward, so the next
forward faults their pages in again: 2,000-8,000 minor page faults a MiniLM bf16 step (16 x 64
tokens), mostly in the big feed-forward tensors (``addmm``, ``gelu`` and its backward). With
freed blocks up to 32 MiB kept (an earlier setting), on a Xeon with AMX (2 threads), a loop of
that step alone took 118-120 ms instead of 127-130 ms, ``bench_dropout_cost.py``'s step
119.5-119.8 instead of 123.9-128.5, and ``make demo`` 72 s against 73 s; with the setting below
the demo took 67 s. Intel's extension for PyTorch gets the same by preloading jemalloc or
tcmalloc.

:func:`keep_freed_memory` makes every block come from the heap (no ``mmap`` of large blocks,
which glibc unmaps on free whatever the thresholds: above 32 MiB it always maps) and sets the
heap's trim threshold to 2 GiB, so that the process keeps about its peak step's memory. Large
steps gain most: one lockstep step of 8 MiniLM clients at 16 x 128 tokens (activations of 50 MB
a tensor) took 2,139 ms with glibc's defaults, 1,912 ms with freed blocks up to 32 MiB kept and
1,588 ms with every block kept (``bench_lockstep_step.py``, same Xeon). The price is resident
memory: a round of 8 SmolLM2 clients ran 1.15-1.19x faster and peaked 29-39 % higher (6.8 GB
against 5.2 one by one, 16.2 against 11.6 four at a time; ``benchmarks/RESULTS.md``). Process-wide;
``fedlease run`` and the Flower apps call it when they load the model,
``FEDLEASE_KEEP_FREED_MEMORY=0`` turns it off. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_BYTES = 2**31 - 1  # mallopt takes an int
ENV = "FEDLEASE_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory (see the module's text); whether it did: False
    without glibc or with ``FEDLEASE_KEEP_FREED_MEMORY=0``."""
    if os.environ.get(ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES)) and bool(mallopt(M_MMAP_MAX, 0))
