"""Registers and spills of the Triton kernels, compiled for a GPU target without a GPU.

Triton ships NVIDIA's ``ptxas``, so the kernels compile to a cubin here for any target (default
sm_90, an H100); ``cuobjdump -res-usage`` then gives each kernel's registers per thread, its stack
frame (non-zero: registers spilled to local memory, which made the first backward kernel 30x
slower at M*r = 64) and its static shared memory. What is compiled is what the backend launches:
one forward and backward of the op is recorded at each shape on tensors without memory (``meta``;
the layer op with a bias, its base GEMM first and last, and the op on a given base output, each
with and without dropout), and every distinct launch (kernel and constexpr flags) is compiled as
Triton's JIT would compile it for a GPU of that target: the same argument binder, so the same
specialisation of every argument (alignment, integers divisible by 16 or equal to 1).

    python benchmarks/kernel_resources.py                  # bf16, the reference expert shapes
    python benchmarks/kernel_resources.py --dtype fp32 --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, even when the interpreter is on

import torch
import triton
from launch_overhead import op_launches
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from fedlease.cli_args import at_least, name_list
from fedlease.ops import triton_backend

KERNELS = ("shrink_route", "expand", "grad_route", "grad_input", "grad_weights")  # launch order
FLAGS = ("HAS_DROPOUT", "HAS_BASE", "HAS_BIAS", "ACCUMULATE")  # the constexpr switches
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXPERT_SHAPES = [(4, 4), (4, 8), (8, 8), (8, 16)]  # (M, r): MiniLM's, the reference ones, M*r=128


def expert_shapes(text: str) -> list[tuple[int, int]]:
    """An argparse type: comma-separated MxR pairs of positive integers, e.g. ``4x4,8x16``."""
    shapes = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        m, _, r = item.partition("x")
        if not (m.isdigit() and r.isdigit() and int(m) > 0 and int(r) > 0):
            raise argparse.ArgumentTypeError(f"expects MxR pairs like 8x16, got {item!r}")
        shapes.append((int(m), int(r)))
    if not shapes:
        raise argparse.ArgumentTypeError(f"expects MxR pairs like 8x16, got {text!r}")
    return shapes


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def available() -> str | None:
    """Why this check cannot run here, or None."""
    if not Path(_tool("ptxas")).exists() or not Path(_tool("cuobjdump")).exists():
        return "this Triton install has no ptxas/cuobjdump"
    return None


def op_variants(
    dtype: torch.dtype, m: int, r: int, tokens: int, d: int, dropout=(False, True)
) -> list[tuple]:
    """``(name, kernel, args, meta)`` of every distinct launch (kernel and flags) the backend makes
    at this shape, in = out = ``d``: the layer op with a bias (base GEMM first, and last) and the op
    on a given base output, with dropout when asked."""
    variants, saved = {}, triton_backend.BASE_GEMM_FIRST
    for p in (0.1 if on else 0.0 for on in dropout):
        for plain, base_first in ((False, True), (False, False), (True, True)):
            triton_backend.BASE_GEMM_FIRST = base_first
            try:
                calls = op_launches(dtype, p, tokens, shape=(d, d, m, r), bias=not plain,
                                    plain=plain, device="meta")  # fmt: skip
            finally:
                triton_backend.BASE_GEMM_FIRST = saved
            for kernel, _, args, meta in calls:
                name = kernel.fn.__name__.removesuffix("_kernel")
                flags = tuple(meta.get(f) for f in FLAGS)
                variants.setdefault((KERNELS.index(name), flags), (name, kernel, args, meta))
    return [variants[key] for key in sorted(variants, key=lambda k: (k[0], str(k[1])))]


def bind(kernel, args: tuple, meta: dict, arch: int = 90) -> tuple:
    """What Triton's JIT makes of a launch of ``kernel`` with ``args`` and ``meta`` on sm_``arch``,
    without a device: ``(backend, bound arguments, specialisation, options)`` from its own
    argument binder (alignment, integers divisible by 16 or equal to 1, constexprs)."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    return (backend, *binder(*args, **meta))


def compile_launch(kernel, args: tuple, meta: dict, arch: int) -> dict:
    """Compile ``kernel`` as a launch with ``args`` and ``meta`` compiles it on sm_``arch``
    (``bind``, then Triton's argument packing: ``JITFunction.run``'s steps without a device);
    return its registers, stack and shared bytes."""
    backend, bound, specialization, options = bind(kernel, args, meta, arch)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound,
                                                              specialization, options)  # fmt: skip
    source = ASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(source, target=backend.target, options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"unexpected cuobjdump output: {usage[-500:]}")
    regs, stack = map(int, found.groups())
    return {"regs": regs, "stack": stack, "shared": int(compiled.metadata.shared)}


def check(dtype: str = "bf16", experts=EXPERT_SHAPES, tokens: int = 16384, d: int = 4096,
          arch: int = 90, dropout=(False, True), kernels=KERNELS,
          progress: bool = False) -> list[dict]:  # fmt: skip
    """One row per (kernel, expert shape, flags) the backend launches: its resources."""
    from tqdm.auto import tqdm

    launches = [(m, r, v) for m, r in experts
                for v in op_variants(DTYPES[dtype], m, r, tokens, d, dropout)
                if v[0] in kernels]  # fmt: skip
    rows = []
    for m, r, (name, kernel, args, meta) in tqdm(launches, desc="compiling", unit="kernel",
                                                 disable=not progress):  # fmt: skip
        res = compile_launch(kernel, args, meta, arch)
        plan = {k: v for k, v in meta.items() if k not in FLAGS and k != "num_warps"}
        rows.append({"kernel": name, "experts": m, "rank": r, "dtype": dtype,
                     "flags": {f: meta[f] for f in FLAGS if f in meta},
                     "num_warps": meta["num_warps"], "meta": plan, **res})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype")
    p.add_argument("--arch", type=at_least(75), default=90,
                   help="compute capability x10, >= 75 (90: H100, H200; default 90)")  # fmt: skip
    p.add_argument(
        "--experts",
        type=expert_shapes,
        default=EXPERT_SHAPES,
        help="expert shapes MxR, comma-separated (default: 4x4,4x8,8x8,8x16)",
    )
    p.add_argument(
        "--kernels",
        type=name_list(KERNELS),
        default=list(KERNELS),
        help="kernels to compile, comma-separated (default: all)",
    )
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = p.parse_args(argv)
    reason = available()
    if reason:
        print(f"kernel_resources: {reason}", file=sys.stderr)
        return 2
    rows = check(args.dtype, args.experts, arch=args.arch, kernels=args.kernels,
                 progress=sys.stderr.isatty())  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"# benchmarks/kernel_resources.py, triton {triton.__version__} (its bundled ptxas), "
          f"target sm_{args.arch}, reference shape 16384 tokens x 4096")  # fmt: skip
    print(f"sm_{args.arch}, {args.dtype}: registers per thread, stack bytes (spills), shared bytes")
    for row in rows:
        flags = ",".join(k for k, v in row["flags"].items() if v) or "-"
        print(f"M={row['experts']} r={row['rank']:<3} {row['kernel']:<13} {flags:<26} "
              f"warps={row['num_warps']} regs={row['regs']:<4} stack={row['stack']:<5} "
              f"shared={row['shared']}")  # fmt: skip
    spilled = [r for r in rows if r["stack"] > 0]
    print(f"{len(spilled)} of {len(rows)} kernels spill")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
