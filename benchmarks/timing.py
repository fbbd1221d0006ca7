"""Timing and machine description shared by the benchmarks."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(fns: dict, device, warmup: int, reps: int) -> dict[str, float]:
    """Median ms of each callable, timed round-robin (one call of each per repetition), so that
    a slow phase of a shared machine hits every row alike instead of whichever ran then."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def versions() -> dict:
    """Versions of what the numbers depend on."""
    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "peft", "transformers", "fedlease"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            out[name] = None
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with its native bf16 features."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from fedlease.precision import cpu_bf16_flags

    flags = cpu_bf16_flags()
    return f"{cpu_name()} ({'bf16: ' + ', '.join(flags) if flags else 'no native bf16'})"
