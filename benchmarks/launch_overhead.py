"""Host time of one kernel launch: where a small layer's call spends its time.

On a GPU a small MoE-LoRA layer is bound by what the host does per call, and the Triton op's
five kernels cost more host time than PEFT's ATen ops (benchmarks/RESULTS.md). On a CUDA device
this separates the parts of one Triton launch, each row launched back to back (no sync inside the
timed loop, so the time per launch is the host's when the GPU keeps up):

- ``aten add_``: one ATen kernel launch, for scale;
- ``triton, 1 tensor`` / ``6 tensors``: a trivial kernel through Triton's JIT launcher
  (``kernel[grid](...)``); per tensor the launcher calls ``data_ptr()`` and
  ``cuPointerGetAttribute``;
- ``triton, 6 int pointers``: the same kernel with its pointer parameters annotated (``*fp32``)
  and given as integers (``data_ptr()`` taken once, outside the loop): the launcher skips both
  calls, the JIT's specialization (alignment) is the same;
- ``triton, 6 tensors, binder only``: the JIT's Python side without the launch
  (``run(..., warmup=True)``: argument binding, specialization, cache lookup);
- the layers at a tiny shape (16 tokens, 64 features, r 4, M 4), forward alone and
  forward+backward: PEFT's LoRA, fedlease's Triton
  op, and the op launched with addresses (``triton_backend.INT_POINTERS``).

Without a CUDA device (``--binder``, the default there) it times the JIT's Python side alone for
each of the op's five kernels at GPU launch plans, given tensors and given addresses
(``fedlease.kernels.pointer_args``), with Triton's driver replaced by a stand-in for an sm_90
target (the kernels compile for it on the CPU; nothing is launched).

    python benchmarks/launch_overhead.py            # CUDA rows, or the binder rows without CUDA
    python benchmarks/launch_overhead.py --binder   # the binder rows
    python benchmarks/launch_overhead.py --json
"""

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial

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
    from bench_layer import Flipped, peft_lora
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
    base = nn.Linear(64, 64, bias=False, device=device).requires_grad_(False)
    layer = MoELoRALinear(base, 4, 4, backend="triton").to(device)
    peft = peft_lora(base, 4, 16).to(device)
    x = torch.randn(16, 64, device=device)
    xg = x.clone().requires_grad_()

    def fwd_bwd(module):
        xg.grad = None
        module.zero_grad(set_to_none=True)
        module(xg).sum().backward()

    flipped = Flipped(layer, "INT_POINTERS")
    for name, module in (("PEFT", peft), ("fedlease", layer), ("fedlease, addresses", flipped)):
        out[f"{name}, forward"] = torch.no_grad()(partial(module, x))
        out[f"{name}, forward+backward"] = partial(fwd_bwd, module)
    return {name: fn for name, fn in out.items() if _runs(name, fn, t)}


def _runs(name: str, fn, t: list) -> bool:
    """Whether a row runs (and the 6-pointer kernels sum right); says why one is left out."""
    t[5].zero_()
    try:
        fn()
    except Exception as e:  # a row that does not run is left out and said why
        print(f"launch_overhead: {name} left out: {type(e).__name__}: {e}", file=sys.stderr)
        return False
    if name in ("triton, 6 tensors", "triton, 6 int pointers") and not torch.allclose(
        t[5], t[0] + t[1] + t[2] + t[3] + t[4]
    ):
        print(f"launch_overhead: {name} left out: wrong sum", file=sys.stderr)
        return False
    return True


def op_launches(dtype: torch.dtype, dropout: float, tokens: int, clients: int = 1, *,
                shape: tuple[int, int, int, int] = (64, 48, 4, 8), bias: bool = False,
                plain: bool = False, device: str = "cpu") -> list[tuple]:  # fmt: skip
    """``(kernel, grid, args, meta)`` of every Triton launch of one forward and backward of the
    layer op (``plain``: of the op on a given base output) at GPU launch plans, recorded instead of
    launched (the backend's launch function is replaced for good). ``shape``: (in, out, M, r);
    ``clients`` > 1: that many clients' stacked adapters, ``tokens`` each, own experts differing;
    ``device="meta"``: tensors without memory, for shapes of any size."""
    from fedlease.ops import triton_backend
    from fedlease.routing import RoutingSpec

    calls = []
    triton_backend._launch = lambda kernel, grid, *args, **meta: calls.append(
        (kernel, grid, args, meta)
    )
    g = torch.Generator().manual_seed(0)
    d, n, m, r = shape
    lead = (clients,) if clients > 1 else ()

    def tensor(*size, grad=True):
        t = torch.randn(*size, generator=g, dtype=dtype) if device == "cpu" else torch.empty(
            *size, dtype=dtype, device=device)  # fmt: skip
        return t.requires_grad_(grad)

    x = tensor(*lead, tokens, d)
    params = [tensor(*lead, *s) for s in ((m, r, d), (m, n, r), (2 * m - 1, d))]
    specs = tuple(RoutingSpec.make("adaptive", m, own_expert=(i + 1) % m) for i in range(clients))
    spec = specs if lead else specs[0]
    if plain:
        base = tensor(*lead, tokens, n)
        y = triton_backend.MoELoRATritonFunction.apply(x, base, *params, spec, 2.0, dropout)
    else:
        weight, b = tensor(n, d, grad=False), tensor(n, grad=False) if bias else None
        y = triton_backend.MoELoRALinearTritonFunction.apply(x, weight, b, *params, spec, 2.0,
                                                             dropout)  # fmt: skip
    y.backward(torch.ones_like(y))
    return calls


def binder_rows() -> dict:
    """The JIT's Python side (``run(..., warmup=True)``) of each launch of the op's forward and
    backward (bf16, dropout 0.1, M = 4, r = 8, 1000 tokens, GPU plans), given tensors and given
    addresses, with a stand-in driver for an sm_90 target."""
    from fedlease.kernels import pointer_args
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class StandIn:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    driver.set_active(StandIn())
    calls = op_launches(torch.bfloat16, 0.1, 1000)
    out = {}
    for kernel, grid, args, meta in calls:
        kernel.run(*args, grid=grid, warmup=True, **meta)  # compiled once, for sm_90

        def with_addresses(kernel=kernel, grid=grid, args=args, meta=meta):
            variant, plain = pointer_args.prepare(kernel, args)
            variant.run(*plain, grid=grid, warmup=True, **meta)

        name = kernel.__name__.removesuffix("_kernel")
        out[f"{name}, tensors"] = partial(kernel.run, *args, grid=grid, warmup=True, **meta)
        out[f"{name}, addresses"] = with_addresses
    return out


def measure(fns: dict, launches: int, reps: int, sync, warmup: int = 20) -> dict[str, float]:
    """Median host microseconds per call of each row (``launches`` calls back to back, then
    ``sync()``), rows timed round-robin after ``warmup`` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(launches):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / launches * 1e6)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--launches", type=at_least(1), default=200,
                   help="calls per timed repetition (default: 200)")  # fmt: skip
    p.add_argument("--reps", type=at_least(1), default=15,
                   help="timed repetitions; the median is reported (default: 15)")  # fmt: skip
    p.add_argument("--binder", action="store_true",
                   help="time the JIT's Python side of the op's launches (the default without "
                   "CUDA; needs no GPU)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    from timing import cpu_name, device_name, versions

    if args.binder or not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("launch_overhead.py: TRITON_INTERPRET=1 is set: the binder rows need Triton's "
                  "compiler, not its interpreter; nothing measured", file=sys.stderr)  # fmt: skip
            return 0
        machine = f"{cpu_name()} (JIT binder only, sm_90 stand-in)"
        times = measure(binder_rows(), args.launches, args.reps, lambda: None)
    else:
        machine = device_name(torch.device("cuda"))
        times = measure(rows(torch.device("cuda")), args.launches, args.reps,
                        torch.cuda.synchronize)  # fmt: skip
    if args.json:
        print(json.dumps({"device": machine, "versions": versions(), "us_per_call": times},
                         indent=2))  # fmt: skip
        return 0
    print(f"device: {machine}; {versions()}")
    for name, us in times.items():
        print(f"{name:<38} {us:8.1f} us per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
