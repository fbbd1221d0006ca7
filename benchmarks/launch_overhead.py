"""Host time of one kernel launch on a CUDA GPU: where a small layer's call spends its time.

On a GPU a small MoE-LoRA layer is bound by what the host does per call, and the Triton op's
five kernels cost more host time than PEFT's ATen ops (benchmarks/RESULTS.md). This separates
the parts of one Triton launch, each row launched back to back (no sync inside the timed loop,
so the time per launch is the host's when the GPU keeps up):

- ``aten add_``: one ATen kernel launch, for scale;
- ``triton, 1 tensor`` / ``6 tensors``: a trivial kernel through Triton's JIT launcher
  (``kernel[grid](...)``); per tensor the launcher calls ``data_ptr()`` and
  ``cuPointerGetAttribute``;
- ``triton, 6 int pointers``: the same kernel with its pointer parameters annotated (``*fp32``)
  and given as integers (``data_ptr()`` taken once, outside the loop): the launcher skips both
  calls, the JIT's specialization (alignment) is the same;
- ``triton, 6 tensors, binder only``: the JIT's Python side without the launch
  (``run(..., warmup=True)``: argument binding, specialization, cache lookup);
- ``fedlease forward`` / ``PEFT forward``: the layers at a tiny shape (forward only, no grad),
  for the sum of their launches.

    python benchmarks/launch_overhead.py            # needs a CUDA device
    python benchmarks/launch_overhead.py --json
"""

import argparse
import json
import statistics
import sys
import time

import torch
import triton
import triton.language as tl

from fedlease.cli_args import at_least


@triton.jit
def touch1(a, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(a + i, tl.load(a + i, mask=i < n) + 1.0, mask=i < n)


@triton.jit
def touch6(a, b, c, d, e, f, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    s = tl.load(a + i, mask=m) + tl.load(b + i, mask=m) + tl.load(c + i, mask=m)
    s += tl.load(d + i, mask=m) + tl.load(e + i, mask=m)
    tl.store(f + i, s, mask=m)


@triton.jit
def touch6_int(a: "*fp32", b: "*fp32", c: "*fp32", d: "*fp32", e: "*fp32", f: "*fp32",  # noqa: F722
               n, BLOCK: tl.constexpr):  # fmt: skip
    """``touch6`` with its pointers annotated, so that they can be passed as integers."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    s = tl.load(a + i, mask=m) + tl.load(b + i, mask=m) + tl.load(c + i, mask=m)
    s += tl.load(d + i, mask=m) + tl.load(e + i, mask=m)
    tl.store(f + i, s, mask=m)


def rows(device: torch.device) -> dict:
    """The callables to time, each one launch (or one layer call); checked once for results."""
    from bench_layer import peft_lora
    from torch import nn

    from fedlease import MoELoRALinear

    n = 256
    t = [torch.rand(n, device=device) for _ in range(6)]
    ptrs = [x.data_ptr() for x in t]
    out = {
        "aten add_": lambda: t[0].add_(1.0),
        "triton, 1 tensor": lambda: touch1[(1,)](t[0], n, BLOCK=256),
        "triton, 6 tensors": lambda: touch6[(1,)](*t, n, BLOCK=256),
        "triton, 6 int pointers": lambda: touch6_int[(1,)](*ptrs, n, BLOCK=256),
        "triton, 6 tensors, binder only": lambda: touch6.run(
            *t, n, BLOCK=256, grid=(1,), warmup=True
        ),
    }
    for name, fn in (("triton, 6 tensors", touch6), ("triton, 6 int pointers", touch6_int)):
        args = t if fn is touch6 else ptrs
        t[5].zero_()
        try:
            fn[(1,)](*args, n, BLOCK=256)
            ok = torch.allclose(t[5], t[0] + t[1] + t[2] + t[3] + t[4])
        except Exception as e:  # a row that does not run is left out and said why
            print(f"launch_overhead: {name} left out: {type(e).__name__}: {e}", file=sys.stderr)
            del out[name]
            continue
        if not ok:
            print(f"launch_overhead: {name} left out: wrong sum", file=sys.stderr)
            del out[name]
    base = nn.Linear(64, 64, bias=False, device=device).requires_grad_(False)
    layer = MoELoRALinear(base, 4, 4, backend="triton").to(device)
    peft = peft_lora(base, 4, 16).to(device)
    x = torch.randn(16, 64, device=device)
    out["fedlease forward (M=4, r=4)"] = torch.no_grad()(lambda: layer(x))
    out["PEFT forward (r=4)"] = torch.no_grad()(lambda: peft(x))
    return out


def measure(fns: dict, launches: int, reps: int) -> dict[str, float]:
    """Median host microseconds per call of each row (``launches`` calls back to back, then one
    synchronisation), rows timed round-robin."""
    for fn in fns.values():
        for _ in range(20):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(launches):
                fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / launches * 1e6)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--launches", type=at_least(1), default=200,
                   help="calls per timed repetition (default: 200)")  # fmt: skip
    p.add_argument("--reps", type=at_least(1), default=15,
                   help="timed repetitions; the median is reported (default: 15)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("launch_overhead.py: no CUDA device here: nothing measured", file=sys.stderr)
        return 0
    device = torch.device("cuda")
    from timing import device_name, versions

    times = measure(rows(device), args.launches, args.reps)
    if args.json:
        print(json.dumps({"device": device_name(device), "versions": versions(),
                          "us_per_call": times}, indent=2))  # fmt: skip
        return 0
    print(f"device: {device_name(device)}; {versions()}")
    for name, us in times.items():
        print(f"{name:<34} {us:8.1f} us per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
