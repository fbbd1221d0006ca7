"""The layer benchmark runs on a tiny shape and reports what its --json promises."""

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, load_script

from fedlease.ops import available_backends

SCRIPT = ROOT / "benchmarks" / "bench_layer.py"


def test_bench_layer_json_on_a_tiny_shape():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--d-in", "32", "--d-out", "24",
         "--rank", "4", "--experts", "3", "--tokens", "200", "--reps", "2", "--warmup", "1",
         "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert set(report) >= {"device", "dtype", "shape", "results", "ratios"}
    assert report["shape"] == {"d_in": 32, "d_out": 24, "rank": 4, "experts": 3, "tokens": 200}
    rows = {"base", "peft_lora", "naive_loop"} | {
        f"fedlease_{b}" for b in available_backends("cpu") if b != "triton"
    }
    assert set(report["results"]) == rows
    for r in report["results"].values():
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["peak_mb"] > 0
    for name, ratio in report["ratios"].items():
        assert name.startswith("fedlease_") and ratio["vs_naive_loop"] > 0
    assert report["auto_backend"] in available_backends("cpu")
    assert report["versions"]["torch"] == torch.__version__

    # benchmarks/layer_table.py turns it into the markdown row gpu_check.sh writes
    layer_table = load_script("benchmarks/layer_table.py")

    result = layer_table.checks(report)
    auto = report["results"][f"fedlease_{report['auto_backend']}"]["fwd_bwd_ms"]
    value, bound, met = result["auto / PEFT"]
    assert value == auto / report["results"]["peft_lora"]["fwd_bwd_ms"] and bound == 0.85
    assert met == (value <= bound)
    row = layer_table.table([report]).splitlines()[-1]
    assert row.startswith("| 32x24, M=3, r=4, 200 tok |") and report["auto_backend"] in row


def test_one_expert_with_dropout_has_its_own_bound():
    """The plain-LoRA shape (one expert, dropout on every row's LoRA input) is held to 0.8x
    PEFT's time and named with its dropout in the table."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--d-in", "32", "--d-out", "32",
         "--rank", "8", "--experts", "1", "--tokens", "64", "--dropout", "0.1", "--reps", "2",
         "--warmup", "1", "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert report["dropout"] == 0.1 and report["shape"]["experts"] == 1
    layer_table = load_script("benchmarks/layer_table.py")
    assert layer_table.checks(report)["auto / PEFT"][1] == 0.8
    assert "naive loop / auto" not in layer_table.checks(report)  # a target at M = 4 only
    row = layer_table.table([report]).splitlines()[-1]
    assert row.startswith("| 32x32, M=1, r=8, 64 tok, dropout 0.1 |")


def test_dropout_outside_its_range_is_refused():
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--dropout", "1"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "--dropout: must be a number with 0 <= P < 1" in done.stderr


def test_a_fedlease_row_that_fails_is_left_out_and_said_so(monkeypatch, capsys):
    """One fedlease row that raises (here the cpp backend's) costs only that row: the shape's
    other rows are timed, and stderr names the row and the error."""
    from fedlease.ops import dispatch

    bench_layer = load_script("benchmarks/bench_layer.py")
    if "cpp" not in available_backends("cpu"):
        pytest.skip("the cpp backend is not built")

    def broken(*args, **kwargs):
        raise RuntimeError("a launch path new to this device")

    cpp = dispatch._REGISTRY["cpp"]
    monkeypatch.setitem(dispatch._REGISTRY, "cpp", dataclasses.replace(cpp, linear_fn=broken))
    args = argparse.Namespace(device="cpu", dtype="float32", d_in=16, d_out=16, rank=4, experts=2,
                              tokens=32, dropout=0.0, reps=1, warmup=0)  # fmt: skip
    report = bench_layer.bench(args)
    assert "fedlease_cpp" not in report["results"]
    assert {"base", "peft_lora", "naive_loop", "fedlease_torch"} <= set(report["results"])
    assert "row fedlease_cpp left out: RuntimeError: a launch path new" in capsys.readouterr().err
