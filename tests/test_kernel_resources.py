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
    """A weight-gradient tile too large for its warps (256 columns x 64 tokens with dropout, on 4
    warps) does spill: the check above can fail."""
    (res,) = compile_rows(
        "kernel, pointers, _ = kr.KERNELS['grad_weights']\n"
        "cx = dict(HAS_DROPOUT=True, UPCAST=False, DOT_PRECISION='tf32', BLOCK_T=64, "
        "BLOCK_D=256, BLOCK_K=32)\n"
        "ints = {'T': 16384, 'D': 4096, 'K': 23, 'stride_xt': 4096, 'tokens_per_split': 2048}\n"
        "print(json.dumps([kr.compile_kernel(kernel, pointers, 'bf16', cx, 4, 90, ints)]))\n"
    )
    assert res["stack"] > 0
