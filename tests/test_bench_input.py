"""The benchmarks' and studies' command lines treat bad input as ``fedlease`` does: exit status
2 and a last line ``<script>: error: ...`` naming the culprit, never a traceback, before any
measurement (a bad ``--clients`` once made bench_round start itself over and over)."""

import argparse
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from fedlease import cli_args

DATA = os.environ.get("FEDLEASE_DATA_DIR")
BENCH = ROOT / "benchmarks"
NO_DATA = str(ROOT / "no-such-data-dir")

# (script, arguments, what the error line must name); {data}: the local GLUE copy
CASES = [
    ("bench_round.py", ["--data-dir", "{data}", "--clients", "0"], "--clients: must be >= 3"),
    ("bench_round.py", ["--data-dir", "{data}", "--clients", "4,x"], "'x' is not an integer"),
    ("bench_round.py", ["--data-dir", NO_DATA], "does not exist"),
    ("bench_round.py", ["--data-dir", "{data}", "--set", "lr=abc"], "'lr'"),
    ("bench_round.py", ["--data-dir", "{data}", "--batched", "0"], "--batched: must be >= 1"),
    # the FLAN tasks are missing from a GLUE copy: the run's own process finds it, the parent
    # passes its line on
    ("bench_round.py", ["--data-dir", "{data}", "--task-type", "generation", "--clients", "3",
                        "--train-samples", "2", "--test-samples", "2"], "FLAN task"),
    ("bench_clients.py", ["--data-dir", "{data}", "--sizes", "5"], "--sizes: must be >= 10"),
    ("bench_clients.py", ["--data-dir", "{data}", "--method", "nope"], "'method'"),
    ("round_time.py", ["--data-dir", NO_DATA], "does not exist"),
    ("clientapp_start.py", ["--data-dir", NO_DATA], "does not exist"),
    ("clientapp_start.py", ["--data-dir", "{data}", "--model", NO_DATA], "no such directory"),
    ("bench_packing.py", ["--data-dir", "{data}", "--reps", "1"], "--reps: must be >= 2"),
    ("bench_packing.py", ["--data-dir", "{data}", "--precision", "fp16"], "'precision'"),
    ("bench_train.py", ["--precisions", "fp16"], "'fp16' is not one of fp32, bf16"),
    ("bench_train.py", ["--seq", "5000"], "--seq 5000: minilm has 512 positions"),
    ("bench_train.py", ["--threads", "100000"], "--threads: must be <= 1024"),  # it crashed
    ("bench_train.py", ["--answer", "0"], "--answer: must be in (0, 1], got 0"),
    ("bench_train.py", ["--answer", "nan"], "--answer: must be in (0, 1], got nan"),
    ("bench_layer.py", ["--device", "cuda:99"], "--device"),
    ("bench_lockstep_step.py", ["--clients", ","], "--clients"),
    ("bench_lockstep_step.py", ["--backends", "nope"], "'nope' is not one of auto, torch"),
    ("bench_dropout_cost.py", ["--steps", "0"], "--steps: must be >= 1"),
    ("host_overhead.py", ["--calls", "-1"], "--calls: must be >= 1"),
    ("launch_overhead.py", ["--reps", "0"], "--reps: must be >= 1"),
    ("profile_layer.py", ["--device", "cpu", "--backends", "nope"], "'nope' is not one of"),
    ("allocation_table.py", [NO_DATA], "is not a fedlease run directory"),
    ("compare_curves.py", [NO_DATA, "--at-round", "1"], "is not a directory"),
    ("robustness.py", ["--data-dir", "{data}", "--task", "nope"], "unknown task 'nope'"),
    ("robustness.py", ["--data-dir", "{data}", "--json", str(ROOT)], "is a directory"),
    ("robust_bias.py", ["--data-dir", NO_DATA], "does not exist"),
    ("warmup_sampling.py", ["--table", NO_DATA], "cannot read"),
    ("warmup_sampling.py", ["--data-dir", "{data}", "--fractions", "0.5,x"], "--fractions"),
    ("gpu_bundle.py", ["pack", "--glue", NO_DATA, "--out", NO_DATA], "no sst2/validation.jsonl"),
    ("gpu_bundle.py", ["pack", "--glue", "{data}", "--flan", "{data}", "--out", NO_DATA],
     "no sst2/test.jsonl there (a FLAN copy)"),
    ("gpu_bundle.py", ["unpack", "--out", NO_DATA], "no bundle there"),
]  # fmt: skip
STUDIES = {"allocation_table.py", "compare_curves.py", "robustness.py", "robust_bias.py",
           "warmup_sampling.py"}  # fmt: skip


@pytest.mark.parametrize("script, args, named", CASES, ids=[f"{c[0]} {c[2]}" for c in CASES])
def test_bad_benchmark_input_exits_2_naming_it(script, args, named):
    if any("{data}" in a for a in args) and not DATA:
        pytest.skip("FEDLEASE_DATA_DIR not set")
    folder = ROOT / "studies" if script in STUDIES else BENCH
    argv = [sys.executable, str(folder / script), *(a.format(data=DATA) for a in args)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert last.startswith(f"{script}: error: ") and named in last, last


def test_the_argument_types_accept_and_refuse():
    assert cli_args.at_least(1)("3") == 3 and cli_args.at_least(0, 5)("0") == 0
    assert cli_args.int_list(2)(" 4, 8,16 ") == [4, 8, 16]
    assert cli_args.name_list(("a", "b"))("b,a") == ["b", "a"]
    assert cli_args.name_list(None)("query, value") == ["query", "value"]
    assert cli_args.existing_device("cpu") == "cpu"
    refused = [(cli_args.at_least(1), "0"), (cli_args.at_least(1), "1.5"),
               (cli_args.at_least(0, 5), "6"), (cli_args.int_list(2), "4,1"),
               (cli_args.int_list(2), " , "), (cli_args.name_list(("a",)), "a,c"),
               (cli_args.name_list(None), ""), (cli_args.existing_device, "tpu")]  # fmt: skip
    for parse, text in refused:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_every_flag_of_every_command_line_explains_itself():
    """``--help`` explains every flag: each ``add_argument`` of fedlease's CLI, the benchmarks and
    the studies has a help text (``argparse.SUPPRESS`` for the internal ones)."""
    import ast

    files = [ROOT / "fedlease" / "cli.py", *sorted(BENCH.glob("*.py")),
             *sorted((ROOT / "studies").glob("*.py"))]  # fmt: skip
    calls = [(path.name, node.lineno) for path in files
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
             and not any(k.arg == "help" for k in node.keywords)]  # fmt: skip
    assert len(files) > 15 and not calls


def test_until_interrupted_keeps_what_finished_before_ctrl_c():
    def measure(n):
        if n == 3:
            raise KeyboardInterrupt
        return n * 10

    assert cli_args.until_interrupted([1, 2, 3, 4], measure) == ([10, 20], True)
    assert cli_args.until_interrupted([1, 2], measure) == ([10, 20], False)
