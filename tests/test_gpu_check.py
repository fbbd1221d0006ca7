"""benchmarks/gpu_check.sh keeps to its time budget: a step without its minimum time left is
skipped and logged, the others run (here on the CPU, where it checks the script itself)."""

import os
import subprocess
import sys

from helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["layer", "launch", "train", "round", "lockstep_step", "round_flan", "tests", "profile",
         "fl_run", "kernel_resources"]  # fmt: skip


def run_check(tmp_path, **env) -> str:
    env = {**os.environ, "PYTHON": sys.executable, "FEDLEASE_SKIP_INSTALL": "1", **env}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return (tmp_path / "out" / "gpu_check.log").read_text()


def test_no_time_left_skips_every_step_and_says_so(tmp_path):
    log = run_check(tmp_path, GPU_CHECK_BUDGET_S="1")
    for name in STEPS:
        assert f"skipping {name}: " in log and "of the 1 s budget left" in log, name
    assert "] done in " in log


def test_a_step_with_time_left_runs(tmp_path):
    log = run_check(tmp_path, GPU_CHECK_BUDGET_S="200", GPU_CHECK_SKIP=" ".join(STEPS[:-1]))
    assert "kernel resources on this GPU's architecture" in log
    assert (
        "kernels spill" in log
        or "no ptxas" in (tmp_path / "out" / "kernel_resources.txt").read_text()
    )
