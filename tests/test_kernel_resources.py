"""The Triton kernels compile for an H100 (sm_90) and keep their tiles in registers.

No GPU is needed: Triton ships NVIDIA's ptxas. A spill (a non-zero stack frame) is what made the
first backward kernel 30x slower on an H100 at M*r = 64; this catches one before a GPU does. The
compiles run in a subprocess: this test process runs Triton in its interpreter.
"""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

pytest.importorskip("triton")
BENCH = ROOT / "benchmarks"


def compile_rows(code: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    prog = f"import json, sys\nsys.path.insert(0, {str(BENCH)!r})\nimport kernel_resources as kr\n"
    prog += "if kr.available(): print(json.dumps(kr.available())); sys.exit(0)\n" + code
    out = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if isinstance(result, str):
        pytest.skip(result)
    return result


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_no_kernel_spills_at_the_largest_expert_shape(dtype):
    """M = 8, r = 16 (M*r = 128, 15 router slots) in bfloat16 (tensor-core dots) and float32
    (``ieee`` dots, whose operands live in registers): every kernel with the meta-parameters the
    backend launches it with, with dropout (its in-kernel random tiles make those the
    register-heaviest variants; benchmarks/results/kernel_resources_sm90*.txt has them all)."""
    code = f"print(json.dumps(kr.check({dtype!r}, experts=[(8, 16)], dropout=(True,))))"
    rows = compile_rows(code)
    assert {r["kernel"] for r in rows} == {
        "shrink_route", "expand", "grad_route", "grad_input", "grad_weights"
    }  # fmt: skip
    spilled = [(r["kernel"], r["flags"], r["regs"], r["stack"]) for r in rows if r["stack"] > 0]
    assert not spilled
    assert all(0 < r["regs"] <= 255 and r["shared"] <= 228 * 1024 for r in rows)  # H100 limits


def test_the_check_sees_a_spill():
    """The weight-gradient launch the backend makes (bf16, dropout, M = 8, r = 16) with a tile too
    large for its warps (256 columns x 64 tokens on 4 warps) does spill: the check above can
    fail."""
    (res,) = compile_rows(
        "import torch\n"
        "(launch,) = [v for v in kr.op_variants(torch.bfloat16, 8, 16, 16384, 4096, (True,))\n"
        "             if v[0] == 'grad_weights']\n"
        "_, kernel, args, meta = launch\n"
        "meta = {**meta, 'BLOCK_T': 64, 'BLOCK_D': 256, 'BLOCK_K': 32, 'num_warps': 4}\n"
        "print(json.dumps([kr.compile_launch(kernel, args, meta, 90)]))\n"
    )
    assert res["stack"] > 0


def test_every_distinct_launch_of_the_op_is_compiled():
    """The variants come from recording the op, not from a list: at one shape, the five kernels
    with every combination of flags the backend launches (the layer op with a bias, base GEMM
    first or last, and the op on a given base output; dropout on and off)."""
    rows = compile_rows(
        "import torch\n"
        "vs = kr.op_variants(torch.bfloat16, 4, 4, 256, 64)\n"
        "print(json.dumps([[v[0], {f: v[3].get(f) for f in kr.FLAGS}] for v in vs]))\n"
    )
    flags = {(name, tuple(k for k, v in f.items() if v)) for name, f in rows}
    assert len(flags) == len(rows) == 12
    assert ("expand", ("HAS_BASE", "HAS_BIAS")) in flags  # base first, with the layer's bias
    assert ("expand", ("HAS_BIAS",)) in flags and ("expand", ("HAS_BASE",)) in flags
    assert {("grad_input", f) for f in [(), ("ACCUMULATE",), ("HAS_DROPOUT",),
                                       ("HAS_DROPOUT", "ACCUMULATE")]} <= flags  # fmt: skip
