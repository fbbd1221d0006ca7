"""Launching the kernels with addresses (``fedlease.kernels.pointer_args``) compiles what launching
them with tensors compiles: for every launch of the op's forward and backward, at GPU launch
plans (one client, and three in one call), Triton's own argument binder gives the typed variant
with integer addresses the specialisation (types, alignment, constants) that it gives the kernel
with the tensors, and never specialises on the token count or the dropout seed. The binders run
for an sm_90 target in a subprocess without the interpreter (no GPU needed); on a GPU the op
itself is compared both ways."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

pytest.importorskip("triton")

CHECK = r"""
import json, sys
sys.path.insert(0, "benchmarks")
import torch
from kernel_resources import bind
from launch_overhead import op_launches
from fedlease.kernels import pointer_args

rows = []
for dtype, p, clients in ((torch.bfloat16, 0.1, 1), (torch.float32, 0.0, 1),
                          (torch.float16, 0.0, 1), (torch.bfloat16, 0.1, 3)):
    calls = op_launches(dtype, p, 1024, clients)
    for kernel, _, args, meta in calls:
        _, _, plain, opts = bind(kernel, args, meta)
        types, addresses = pointer_args.addresses(args)
        variant = pointer_args.typed_variant(kernel, types)
        _, _, typed, typed_opts = bind(variant, addresses, meta)
        rows.append({"kernel": kernel.__name__, "dtype": str(dtype), "types": list(types),
                     "clients": clients,
                     "same": [list(a) for a in plain] == [list(b) for b in typed]
                             and opts == typed_opts,
                     "plain": repr(plain),
                     "unspecialised": [repr(plain[kernel.arg_names.index(name)])
                                       for name in ("T", "seed") if name in kernel.arg_names]})
print(json.dumps(rows))
"""


def test_typed_variants_specialise_as_the_tensors_do():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    kernels = {"shrink_route_kernel", "expand_kernel", "grad_route_kernel", "grad_input_kernel",
               "grad_weights_kernel"}  # fmt: skip
    assert {row["kernel"] for row in rows} == kernels  # every launch of forward and backward
    assert len(rows) == 4 * len(kernels)  # three dtypes, and three clients in one call
    assert {"bf16", "fp32", "fp16", "i32"} <= {t for row in rows for t in row["types"]}
    bad = [(row["kernel"], row["dtype"], row["plain"]) for row in rows if not row["same"]]
    assert not bad
    assert any("'D'" in row["plain"] for row in rows)  # alignment is part of what is compared
    # neither the token count (1024: specialised, it would read 'D') nor the dropout seed is
    # specialised on: one compiled kernel for all of them
    values = [v for row in rows for v in row["unspecialised"]]
    assert len(values) == 4 * 5 + 4 * 3, values
    assert not any("constexpr" in v or "'D'" in v for v in values), values


def test_a_variant_takes_its_types_in_the_pointers_order():
    from fedlease.kernels import moe_lora_fwd, pointer_args

    kernel = moe_lora_fwd.expand_kernel
    names = pointer_args.pointer_names(kernel)
    assert names == ["h_ptr", "b_ptr", "base_ptr", "bias_ptr", "y_ptr"]
    with pytest.raises(ValueError, match="has 5 pointers, got 2 types"):
        pointer_args.typed_variant(kernel, ("bf16", "fp32"))
    types, plain = pointer_args.addresses((torch.ones(2), 3, torch.ones(2, dtype=torch.bfloat16)))
    assert types == ("fp32", "bf16") and plain[1] == 3 and all(isinstance(v, int) for v in plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("clients", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_op_with_addresses_computes_what_it_computes_with_tensors(dtype, clients, monkeypatch):
    """Forward and every gradient, bit for bit: the same compiled kernels, the same inputs (one
    client, and three in one call)."""
    from fedlease.ops import triton_backend as tb
    from fedlease.routing import RoutingSpec

    g = torch.Generator(device="cuda").manual_seed(0)
    t, d, n, m, r = 777 // clients, 96, 80, 4, 8
    lead = (clients,) if clients > 1 else ()

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", generator=g) * scale

    inputs = [rnd(*lead, t, d), rnd(n, d), rnd(n), rnd(*lead, m, r, d, scale=0.1),
              rnd(*lead, m, n, r, scale=0.1), rnd(*lead, 2 * m - 1, d)]  # fmt: skip
    specs = tuple(RoutingSpec.make("adaptive", m, own_expert=(2 + i) % m) for i in range(clients))
    spec = specs if lead else specs[0]
    results = []
    for on in (False, True):
        monkeypatch.setattr(tb, "INT_POINTERS", on)
        leaves = [v.to(dtype).requires_grad_(i != 1) for i, v in enumerate(inputs)]
        torch.manual_seed(5)  # the dropout seed
        y = tb.MoELoRALinearTritonFunction.apply(*leaves[:3], *leaves[3:], spec, 2.0, 0.1)
        y.backward(torch.ones_like(y))
        results.append([y.detach()] + [v.grad for i, v in enumerate(leaves) if i != 1])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_launch_overhead_times_the_binder_without_a_gpu():
    """``launch_overhead.py --binder`` runs the JIT's Python side of the op's ten launch rows
    (five kernels, tensors and addresses) against a stand-in sm_90 driver and reports each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "launch_overhead.py"),
                          "--binder", "--reps", "1", "--launches", "2", "--json"], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    times = json.loads(out.stdout)["us_per_call"]
    assert len(times) == 10 and all(v > 0 for v in times.values())
    assert {"shrink_route, tensors", "grad_weights, addresses"} <= set(times)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_launch_overhead_gpu_rows_run_in_the_interpreter():
    """The GPU rows' code, run on CPU tensors in Triton's interpreter (this process's): every row
    runs except the integer-pointer kernel, which the interpreter cannot take and the script
    leaves out, saying so (the op's ``INT_POINTERS`` falls back to tensors there)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import launch_overhead

    rows = launch_overhead.rows(torch.device("cpu"))
    assert "triton, 6 int pointers" not in rows
    assert {"aten add_", "triton, 6 tensors", "PEFT, forward+backward",
            "fedlease, addresses, forward+backward"} <= set(rows)  # fmt: skip
    times = launch_overhead.measure(rows, 1, 1, lambda: None, warmup=0)
    assert set(times) == set(rows) and all(v > 0 for v in times.values())
