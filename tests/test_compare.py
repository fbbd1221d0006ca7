"""``fedlease compare``: methods on the same partitions, a table, reuse of finished runs."""

import json
import os

import numpy as np
import pytest
import torch
import yaml

from fedlease.cli import main
from fedlease.fl.config import METHODS

pytestmark = pytest.mark.skipif(
    not os.environ.get("FEDLEASE_DATA_DIR"), reason="FEDLEASE_DATA_DIR not set"
)

TINY = {"clients": ["sst2", "mrpc", "sst2", "mrpc"], "precision": "fp32", "train_samples": 16,
        "test_samples": 8,
        "warmup_rounds": 1, "rounds": 1, "local_epochs": 1, "max_seq_len": 32,
        "max_experts": 2}  # fmt: skip


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_two_methods_two_seeds(config, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(config), "--methods", "fedit,fedlease", "--seeds", "1,2",
            "--output", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "compare.json").read_text())
    assert list(result["methods"]) == ["fedit", "fedlease"] and result["seeds"] == [1, 2]
    for name, row in result["methods"].items():
        assert set(row["per_task"]) == {"sst2", "mrpc"} and len(row["per_seed"]) == 2
        for seed in (1, 2):  # the summary of each run is what the row averages
            s = json.loads((out / f"{name}-seed{seed}" / "summary.json").read_text())
            assert s["method"] == name and s["final"]["mean"] == row["per_seed"][seed - 1]
        # MRPC's F1: the mean over seeds of each run's mean over its MRPC clients
        runs = [json.loads((out / f"{name}-seed{s}" / "summary.json").read_text()) for s in (1, 2)]
        per_run = [np.mean([c["f1"] for c in r["final"]["per_client"] if c["task"] == "mrpc"])
                   for r in runs]  # fmt: skip
        assert set(row["per_task_f1"]) == {"mrpc"}
        assert row["per_task_f1"]["mrpc"] == pytest.approx(np.mean(per_run))
    # FedIT exchanges the whole LoRA both ways every round: bytes up == bytes down
    fedit = result["methods"]["fedit"]["bytes_per_round"]
    assert fedit["up"] == fedit["down"] > 0
    table = (out / "compare.md").read_text()
    assert "| fedit |" in table and "| fedlease |" in table and "average" in table
    assert "mrpc F1" in table and "wall (s, all seeds)" in table
    assert (out / "compare.png").stat().st_size > 0
    # the same partition for every method under one seed
    parts = [json.loads((out / f"{m}-seed1" / "summary.json").read_text())["samples"]
             for m in ("fedit", "fedlease")]  # fmt: skip
    assert parts[0] == parts[1]
    # a second invocation reuses the finished runs (their summaries are not rewritten)
    stamp = (out / "fedit-seed1" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert (out / "fedit-seed1" / "summary.json").stat().st_mtime_ns == stamp
    assert "| fedlease |" in capsys.readouterr().out


@pytest.mark.slow
def test_every_method_runs_end_to_end(config, tmp_path):
    others = [m for m in METHODS if m not in ("fedit", "fedlease")]
    out = tmp_path / "all"
    assert main(["compare", "--config", str(config), "--methods", ",".join(others),
                 "--output", str(out), "--no-progress"]) == 0  # fmt: skip
    rows = json.loads((out / "compare.json").read_text())["methods"]
    assert list(rows) == others
    assert rows["local"]["bytes_per_round"] == {"up": 0.0, "down": 0.0}
    for name, row in rows.items():
        assert 0.0 <= row["mean"] <= 1.0, name


def test_bad_method_and_seeds_are_named(config, tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["compare", "--config", str(config), "--methods", "fedit,fedavgx",
                 "--output", out]) == 2  # fmt: skip
    assert "unknown method 'fedavgx'" in capsys.readouterr().err
    assert main(["compare", "--config", str(config), "--methods", "fedit", "--seeds", "1,b",
                 "--output", out]) == 2  # fmt: skip
    assert "--seeds: 'b' is not an integer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_finished_runs_from_another_device_are_tabulated_without_it(config, tmp_path, capsys):
    """Runs made on a GPU are merged on a machine without one; a run still to do stops the
    command (exit 2) naming the device before anything runs."""
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(config), "--methods", "fedit", "--seeds", "1",
            "--output", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    run_dir = out / "fedit-seed1"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["device"] = "cuda"  # as written by the same command on a GPU machine
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (out / "compare.json").unlink()
    if torch.cuda.is_available():
        pytest.skip("this machine has the device")
    assert main([*args, "--set", "device=cuda"]) == 0
    assert json.loads((out / "compare.json").read_text())["config"]["device"] == "cuda"
    (run_dir / "summary.json").unlink()
    capsys.readouterr()
    assert main([*args, "--set", "device=cuda"]) == 2
    assert "'device'" in capsys.readouterr().err


def test_config_differences_count_a_key_a_run_predates_as_its_default():
    """A finished run's config.yaml from before a key existed matches a config that leaves the
    key at its default, and only then; any other difference is named."""
    from fedlease.fl.compare import config_differences
    from fedlease.fl.config import from_dict

    want = from_dict(dict(TINY)).to_dict()
    old = {k: v for k, v in want.items() if k != "warmup_average_b"}
    assert config_differences(old, want) == []
    assert config_differences(old, {**want, "warmup_average_b": True}) == [
        "warmup_average_b: False -> True"
    ]
    assert config_differences({**want, "lr": 0.001}, want) == ["lr: 0.001 -> 0.003"]
    assert config_differences({**want, "retired_key": 1}, want) == ["retired_key: 1 -> None"]


def test_a_run_with_another_config_is_refused_naming_the_difference(config, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(config), "--methods", "fedit", "--seeds", "1",
            "--output", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--set", "lr=0.001"]) == 2
    assert "lr: 0.003 -> 0.001" in capsys.readouterr().err
