"""Injected client crashes and NaN updates: the run completes with the survivors, logs both."""

import json
import os

import numpy as np
import pytest
import yaml

from fedlease.cli import main
from fedlease.fl.faults import FaultPlan, non_finite, poison

CLIENTS = ["sst2", "mrpc", "sst2", "mrpc"]
ROUNDS = 3  # 1 warm-up + 2 adaptive


def pick_seed() -> int:
    """A fault seed whose plan has a crash and a NaN update, and a survivor in every round."""
    for seed in range(1000):
        plan = FaultPlan(0.3, 0.3, seed)
        fails = [[plan.fail_at_step(r, c, 2) is not None for c in range(4)] for r in range(ROUNDS)]
        nans = [[plan.poisons(r, c) and not fails[r][c] for c in range(4)] for r in range(ROUNDS)]
        ok = [[not f and not p for f, p in zip(fr, pr)] for fr, pr in zip(fails, nans)]
        if any(map(any, fails[1:])) and any(map(any, nans[1:])) and all(map(any, ok)):
            return seed
    raise AssertionError("no suitable seed")


def test_plan_is_deterministic_and_poison_is_caught():
    a, b = FaultPlan(0.5, 0.5, 7), FaultPlan(0.5, 0.5, 7)
    draws = [(a.fail_at_step(r, c, 10), a.poisons(r, c)) for r in range(5) for c in range(5)]
    assert draws == [
        (b.fail_at_step(r, c, 10), b.poisons(r, c)) for r in range(5) for c in range(5)
    ]
    assert any(d[0] is not None for d in draws) and any(d[1] for d in draws)
    import torch

    update = {"x.lora_A": torch.ones(2, 2), "x.router": torch.ones(3)}
    assert non_finite(update) == []
    assert non_finite(poison(update)) == ["x.lora_A"] and torch.all(update["x.lora_A"] == 1)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FEDLEASE_DATA_DIR"), reason="FEDLEASE_DATA_DIR not set")
def test_run_survives_crashes_and_rejects_nan_updates(tmp_path):
    seed = pick_seed()
    cfg = {
        "clients": CLIENTS, "precision": "fp32", "train_samples": 32, "test_samples": 16,
        "warmup_rounds": 1,
        "rounds": ROUNDS - 1, "local_epochs": 1, "max_seq_len": 32, "num_experts": 2,
        "faults": {"client_failure_rate": 0.3, "nan_update_rate": 0.3, "seed": seed},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="injected crash|rejected client"):
        assert main(["run", "--config", str(tmp_path / "c.yaml"), "--output", str(out),
                     "--no-progress"]) == 0  # fmt: skip
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    plan = FaultPlan(0.3, 0.3, seed)
    steps = 2  # 32 samples / batch 16, one epoch
    expert = 12 * (4 * 384 + 384 * 4) * 4
    router = 12 * 3 * 384 * 4
    for r, row in enumerate(rows):
        failed = [c for c in range(4) if plan.fail_at_step(r, c, steps) is not None]
        rejected = [c for c in range(4) if c not in failed and plan.poisons(r, c)]
        assert row["failed"] == failed and row["rejected"] == rejected, r
        for c in row["clients"]:
            want = (
                "failed"
                if c["client"] in failed
                else "rejected"
                if c["client"] in rejected
                else "ok"
            )
            assert c["status"] == want
            assert (c["train_loss"] is None) == (want == "failed")
        if row["phase"] == "adaptive":  # everyone but the crashed clients uploads
            allocation = 4 * expert if r == 1 else 0  # all warm-up LoRAs, before round 1
            assert row["bytes_up"] == (4 - len(failed)) * (expert + router) + allocation
        assert np.isfinite(row["mean_accuracy"])
    summary = json.loads((out / "summary.json").read_text())
    assert all(np.isfinite(c["accuracy"]) for c in summary["final"]["per_client"])
