"""Registers and spills of the Triton kernels, compiled for a GPU target without a GPU.

Triton ships NVIDIA's ``ptxas``, so the kernels compile to a cubin here for any target (default
sm_90, an H100); ``cuobjdump -res-usage`` then gives each kernel's registers per thread, its stack
frame (non-zero: registers spilled to local memory, which made the first backward kernel 30x
slower at M*r = 64) and its static shared memory. Every kernel is compiled with the meta-parameters
``fedlease.kernels.launch`` gives the backend for that shape, so this checks what actually runs.

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

import triton
from fedlease.kernels import launch, moe_lora_bwd, moe_lora_fwd
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fedlease.cli_args import at_least, name_list

IN, F32, I32 = "in", "fp32", "i32"  # pointer element types: the input dtype, float32 scratch,
# int32 (each client's own expert)
KERNELS = {  # plan key -> (kernel, pointer element types, constexpr flags besides the plan's)
    "shrink_route": (moe_lora_fwd.shrink_route_kernel,
                     {"x_ptr": IN, "router_ptr": IN, "a_cat_ptr": IN, "own_ptr": I32,
                      "q_ptr": F32, "a_ptr": F32, "h_ptr": IN}, ("HAS_DROPOUT",)),
    "expand": (moe_lora_fwd.expand_kernel,
               {"h_ptr": IN, "b_ptr": IN, "base_ptr": IN, "bias_ptr": IN, "y_ptr": IN},
               ("HAS_BASE", "HAS_BIAS")),
    "grad_route": (moe_lora_bwd.grad_route_kernel,
                   {"dy_ptr": IN, "b_ptr": IN, "own_ptr": I32, "q_ptr": F32, "a_ptr": F32,
                    "dz_ptr": F32}, ()),
    "grad_input": (moe_lora_bwd.grad_input_kernel,
                   {"dz_ptr": F32, "router_ptr": IN, "a_cat_ptr": IN, "dx_ptr": IN},
                   ("HAS_DROPOUT",)),
    "grad_weights": (moe_lora_bwd.grad_weights_kernel,
                     {"dz_ptr": F32, "x_ptr": IN, "d_router_ptr": F32, "d_a_ptr": F32},
                     ("HAS_DROPOUT",)),
}  # fmt: skip
FLOAT_ARGS = {"scaling", "p_drop"}
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
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


def launch_ints(tokens: int, d: int, slots: int, mr: int, m: int, plan) -> dict[str, int]:
    """The integer arguments a launch at this shape passes (in = out = ``d``, contiguous)."""
    return {"T": tokens, "D": d, "N": d, "S": slots, "M": m, "MR": mr, "R": mr // m,
            "K": slots + mr, "stride_xt": d, "stride_rs": d, "stride_am": d,
            "stride_rc": slots * d, "stride_ac": mr * d, "stride_bc": mr * d,
            "stride_bn": mr // m, "stride_bm": d * (mr // m), "C": 1,
            "stride_dyt": d, "stride_dxt": d, "stride_yt": d, "stride_baset": d,
            "tokens_per_split": plan.tokens_per_split,
            "cols_per_program": plan.cols_per_program}  # fmt: skip


def compile_kernel(kernel, pointers: dict, dtype: str, constexprs: dict, num_warps: int,
                   arch: int, ints: dict[str, int] | None = None) -> dict:  # fmt: skip
    """Compile ``kernel`` for sm_``arch``; return its registers, stack and shared bytes.

    ``ints``: values of integer arguments; as a real launch does, those divisible by 16 are
    compiled as such (it lets loads vectorise)."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + (dtype if pointers[name] == IN else pointers[name])
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    # Tensor pointers from torch are 16-byte aligned, and Triton specialises integer arguments
    # divisible by 16 (but those a kernel says not to): tell the compiler, as launches do.
    aligned = [*pointers, *(k for k, v in (ints or {}).items()
                            if v % 16 == 0 and k not in kernel.do_not_specialize)]  # fmt: skip
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned
             if a in kernel.arg_names}  # fmt: skip
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs=attrs,
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output: {usage[-500:]}")
    regs, stack = map(int, m.groups())
    return {"regs": regs, "stack": stack, "shared": int(compiled.metadata.shared)}


def _variants(key: str, flags: tuple, dropout) -> list[dict]:
    """The constexpr flag combinations a kernel is launched with."""
    if key == "expand":  # the linear op (bias, no base) and the plain op (base)
        return [{"HAS_BASE": False, "HAS_BIAS": True}, {"HAS_BASE": True, "HAS_BIAS": False}]
    if key == "grad_input":  # dx written, or added onto the base GEMM's dx
        return [{"HAS_DROPOUT": on, "ACCUMULATE": acc} for on in dropout for acc in (False, True)]
    return [dict.fromkeys(flags, on) for on in dropout] if flags else [{}]


def check(dtype: str = "bf16", experts=EXPERT_SHAPES, tokens: int = 16384, d: int = 4096,
          arch: int = 90, dropout=(False, True), kernels=tuple(KERNELS),
          progress: bool = False) -> list[dict]:  # fmt: skip
    """One row per (kernel, expert shape, flags): its resources under the backend's plan."""
    from tqdm.auto import tqdm

    total = len(experts) * sum(len(_variants(k, KERNELS[k][2], dropout)) for k in kernels)
    bar = tqdm(total=total, desc="compiling", disable=not progress, unit="kernel")
    rows = []
    for m, r in experts:
        slots, mr = 2 * m - 1, m * r
        wide = dtype == "fp32"
        backward = launch.backward_plan(tokens, d, slots, mr, interpreter=False, wide=wide)
        forward = launch.forward_plan(slots, mr, interpreter=False, wide=wide)
        meta = {**forward.meta, **backward.meta}
        ints = launch_ints(tokens, d, slots, mr, m, backward)
        for key in kernels:
            kernel, pointers, flags = KERNELS[key]
            if key == "grad_weights" and backward.splits == 1:  # written in the input dtype
                pointers = {**pointers, "d_router_ptr": IN, "d_a_ptr": IN}
            plan = dict(meta[key])
            num_warps = plan.pop("num_warps")
            for flag_values in _variants(key, flags, dropout):
                constexprs = {**plan, **flag_values, "UPCAST": dtype == "fp32",
                              "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}  # fmt: skip
                res = compile_kernel(kernel, pointers, DTYPES[dtype], constexprs, num_warps, arch,
                                     ints)  # fmt: skip
                rows.append({"kernel": key, "experts": m, "rank": r, "dtype": dtype,
                             "flags": flag_values, "num_warps": num_warps,
                             "meta": {k: v for k, v in plan.items()}, **res})  # fmt: skip
                bar.update()
    bar.close()
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
        type=name_list(tuple(KERNELS)),
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
        print(f"M={row['experts']} r={row['rank']:<3} {row['kernel']:<13} {flags:<18} "
              f"warps={row['num_warps']} regs={row['regs']:<4} stack={row['stack']:<5} "
              f"shared={row['shared']}")  # fmt: skip
    spilled = [r for r in rows if r["stack"] > 0]
    print(f"{len(spilled)} of {len(rows)} kernels spill")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
