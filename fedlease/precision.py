"""Where and in what precision a model trains: device, bf16 or fp32, and what follows from them.

``precision="bf16"`` means mixed precision the way most training loops do it: the frozen base is
stored in bfloat16, the trainable tensors (adapters, routers, heads) stay float32 master weights
with float32 optimiser state, and forward and backward run under ``torch.autocast``. ``auto``
picks bf16 only where the hardware computes it fast: a CUDA GPU of compute capability >= 8.0, or
a CPU with AMX-BF16 or AVX512-BF16 on which a bf16 matmul measures faster than float32. A CPU
without them emulates bf16 (measured on a 2-core AMD EPYC with AVX2 only: a MiniLM-sized layer's
forward+backward about 40x slower than in float32), so ``auto`` keeps float32 there.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time

import torch
from torch import nn

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
BF16_MIN_SPEEDUP = 1.2  # how much faster a bf16 matmul must be for `auto` to choose bf16 on CPU
# torch's intra-op threads at most: far above any CPU torch runs on; 100,000 of them exhausted the
# process's memory mappings at start (a segmentation fault, not an error)
MAX_THREADS = 1024


def resolve_device(name: str) -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``; ``ValueError`` naming
    the value when it is malformed or names a GPU this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise ValueError(f"{name!r} is not a device (use one of {', '.join(DEVICES)})")
    if not torch.cuda.is_available():
        raise ValueError(f"{name!r}: no CUDA GPU is available here (torch {torch.__version__})")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"{name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device("cuda", index)


def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's native bf16 features among ``CPU_BF16_FLAGS`` (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])  # fmt: skip
    except OSError:
        return ()
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)


@functools.cache
def cpu_bf16_speedup() -> float:
    """Measured time of a float32 matmul over a bf16 one (MiniLM's feed-forward shape) on one
    thread, each the fastest of five calls in the thread's CPU time: time another process takes
    from it does not count (timed by the wall clock, two busy processes on a 2-core Xeon with AMX
    took the measure from 10x to below 1.2x, and a run chose float32). Its inputs come from a
    generator of its own: asking leaves the global random state as it was."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 384, generator=g), torch.randn(384, 1536, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {dtype: _fastest_matmul(a.to(dtype), b.to(dtype))
                 for dtype in (torch.float32, torch.bfloat16)}  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return times[torch.float32] / times[torch.bfloat16]


def _fastest_matmul(x: torch.Tensor, y: torch.Tensor, calls: int = 5) -> float:
    x @ y  # warm-up
    seconds = []
    for _ in range(calls):
        t0 = time.thread_time()
        x @ y
        seconds.append(time.thread_time() - t0)
    return min(seconds)


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return bool(cpu_bf16_flags()) and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for ``name`` (``auto``, ``fp32`` or ``bf16``) on ``device``."""
    if name not in PRECISIONS:
        raise ValueError(f"{name!r} is not a precision (use one of {', '.join(PRECISIONS)})")
    if name == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return name


def attention_for(device: torch.device, precision: str) -> str:
    """The attention implementation to load models with. In bf16 on CPU the eager attention:
    PyTorch's CPU SDPA backward in bf16 took 53 % of a MiniLM step on a Xeon with AMX, eager was
    2.1x faster there; SDPA elsewhere (see benchmarks/RESULTS.md, `bench_train.py --attn`)."""
    return "eager" if device.type == "cpu" and precision == "bf16" else "sdpa"


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store every frozen floating parameter and buffer in ``dtype``; trainable ones keep theirs
    (float32 master weights). In place; returns ``model``."""
    for module in model.modules():
        for p in list(module.parameters(recurse=False)):
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point():
                setattr(module, name, b.to(dtype))
    return model


def autocast(device: torch.device, precision: str):
    """The context a forward/backward runs in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
