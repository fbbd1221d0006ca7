"""A run killed with SIGKILL mid-round resumes from its last checkpoint to the same result."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers import kill_after_rounds

from fedlease.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("FEDLEASE_DATA_DIR"), reason="FEDLEASE_DATA_DIR not set"),
]

TINY = {
    "clients": ["sst2", "mrpc", "sst2"],
    "precision": "fp32",
    "train_samples": 32,
    "test_samples": 16,
    "warmup_rounds": 2,
    "rounds": 2,
    "local_epochs": 1,
    "max_seq_len": 32,
    "max_experts": 2,
    "threads": 1,  # same GEMM blocking in every process: bit-identical results
    "seed": 3,
}


def _cmd(*args):
    return [sys.executable, "-m", "fedlease", "run", "--no-progress", *args]


def _strip_times(obj):
    if isinstance(obj, dict):
        return {
            k: _strip_times(v) for k, v in obj.items() if k not in ("wall_s", "resumed_from_round")
        }
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


def _read(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return _strip_times(summary), _strip_times(metrics)


def test_sigkill_mid_round_then_resume_matches_uninterrupted(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(_cmd("--config", str(cfg), "--output", str(whole)), check=True,
                   capture_output=True, timeout=600)  # fmt: skip

    # first adaptive round complete -> killed inside the next
    kill_after_rounds(_cmd("--config", str(cfg), "--output", str(broken)), broken, 3)
    state = broken / "checkpoint" / "state.json"
    assert not (broken / "summary.json").exists(), "killed after the run had finished"
    assert json.loads(state.read_text())["rounds_done"] == 3
    done_rows = (broken / "metrics.jsonl").read_text().splitlines()
    assert len(done_rows) == 3  # no completed round was lost

    assert main(["run", "--resume", str(broken), "--no-progress"]) == 0
    assert json.loads((broken / "summary.json").read_text())["resumed_from_round"] == 3
    assert json.loads((whole / "summary.json").read_text())["resumed_from_round"] is None
    summary_b, metrics_b = _read(broken)
    summary_a, metrics_a = _read(whole)
    assert summary_b == summary_a  # exact: same seeds, one thread, deterministic CPU kernels
    assert metrics_b == metrics_a
    assert json.loads((broken / "clusters.json").read_text()) == json.loads(
        (whole / "clusters.json").read_text()
    )


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err


def _warm_lora_template():
    """The warm-up LoRA tensors of the bundled model at rank 4 (shapes and dtypes only matter)."""
    from fedlease import inject_moe_lora, models
    from fedlease.adapter_io import adapter_state_dict
    from fedlease.inject import MoELoRAConfig

    model, _ = models.load("minilm", num_labels=2)
    inject_moe_lora(model, MoELoRAConfig(num_experts=1, rank=4, routing="dense"))
    return {
        k: v for k, v in adapter_state_dict(model).items() if k.endswith((".lora_A", ".lora_B"))
    }


def test_resume_refuses_a_checkpoint_that_does_not_fit(tmp_path, capsys):
    """A checkpoint whose tensors do not fit the model is refused, naming the tensor."""
    import torch

    from fedlease.fl import checkpoint

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    meta = {"comm": {"up": 0, "down": 0}, "metrics": [], "initial_mean": 0.5, "elapsed_s": 1.0,
            "strategy": {"allocation": None}}  # fmt: skip
    # a state.json a run could write (it is checked first), tensors that do not fit
    tensors = {f"client{i}/classifier.weight": torch.zeros(2, 3) for i in range(3)}
    checkpoint.save(tmp_path, 0, meta, tensors)
    assert main(["run", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert "holds no tensors for 'warm_global'" in capsys.readouterr().err  # server state absent
    lora = "bert.encoder.layer.0.attention.self.query.lora_A"
    tensors |= {f"s.warm_global/{lora}": torch.zeros(1, 4, 384)}
    checkpoint.save(tmp_path, 0, meta, tensors)
    assert main(["run", "--resume", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint warm_global" in err and "missing keys" in err
    warm = {f"s.warm_global/{k}": v for k, v in _warm_lora_template().items()}
    checkpoint.save(tmp_path, 0, meta, {**tensors, **warm})
    assert main(["run", "--resume", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint client0" in err and "classifier.weight: shape (2, 3)" in err
    assert "missing keys" in err  # every adapter tensor is absent too
    (tmp_path / "checkpoint" / "state.json").write_text("{truncated")
    assert main(["run", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_checkpoint_rewrites_only_the_groups_that_changed(tmp_path):
    """Per-client files: an unchanged client keeps its file from the previous checkpoint; the
    loaded checkpoint holds every group; files no longer named are removed."""
    import torch

    from fedlease.fl import checkpoint

    meta = {"comm": {}, "metrics": []}
    server = {"s.global/w": torch.ones(2)}
    clients = {"client0": {"w": torch.zeros(3)}, "client1": {"w": torch.full((3,), 2.0)}}
    checkpoint.save(tmp_path, 1, meta, server, clients)
    clients["client0"] = {"w": torch.full((3,), 5.0)}
    checkpoint.save(tmp_path, 2, meta, server, clients, unchanged={"client1"})
    files = sorted(p.name for p in (tmp_path / "checkpoint").glob("*.safetensors"))
    assert files == ["client0-0002.safetensors", "client1-0001.safetensors",
                     "state-0002.safetensors"]  # fmt: skip
    groups = checkpoint.unpack(checkpoint.load(tmp_path).tensors)
    assert torch.equal(groups["client0"]["w"], torch.full((3,), 5.0))
    assert torch.equal(groups["client1"]["w"], torch.full((3,), 2.0))
    assert torch.equal(groups["s.global"]["w"], torch.ones(2))
    (tmp_path / "checkpoint" / "client1-0001.safetensors").write_bytes(b"truncated")
    with pytest.raises(checkpoint.CheckpointError, match="client1-0001.safetensors"):
        checkpoint.load(tmp_path)
