"""Partial participation: seeded draws per round, only participants train and are aggregated,
the others keep their state; evaluation every k rounds; the compact `clients` form."""

import math
import os

import pytest
import torch
from helpers import interrupted, strict_json

from fedlease.fl import ConfigError, from_dict
from fedlease.fl.driver import RoundDriver
from fedlease.fl.participation import evaluated, participants
from fedlease.fl.simulator import run, simulation

BASE = {"clients": {"sst2": 3, "mrpc": 3}, "precision": "fp32", "train_samples": 16,
        "test_samples": 8,
        "warmup_rounds": 1, "rounds": 3, "local_epochs": 1, "max_seq_len": 24, "max_experts": 2,
        "threads": 1, "seed": 2}  # fmt: skip


def test_the_compact_clients_form_expands_in_order():
    cfg = from_dict(BASE)
    assert cfg.clients == ["sst2"] * 3 + ["mrpc"] * 3
    for bad, pattern in [({"sst2": 0}, "sst2: 0 must be >= 1"),
                         ({"sst2": "many"}, "'sst2': 'many' must be a task name and a whole"),
                         ({"imdb": 3}, "unknown task 'imdb'")]:  # fmt: skip
        with pytest.raises(ConfigError, match=pattern):
            from_dict(BASE | {"clients": bad})


def test_draws_are_seeded_sized_and_differ_across_seeds():
    cfg = from_dict(BASE | {"clients": {"sst2": 50, "qnli": 50}, "clients_per_round": 0.05})
    rounds = [participants(cfg, r) for r in range(20)]
    assert all(len(ids) == 5 and ids == sorted(set(ids)) for ids in rounds)
    assert rounds == [participants(cfg, r) for r in range(20)]  # a pure function of seed, round
    assert len({tuple(ids) for ids in rounds}) > 15  # different clients from round to round
    other = from_dict(BASE | {"clients": {"sst2": 50, "qnli": 50}, "clients_per_round": 0.05,
                              "seed": 3})  # fmt: skip
    assert [participants(other, r) for r in range(20)] != rounds
    assert participants(cfg, 4, sampled=False) == list(range(100))
    assert participants(from_dict(BASE | {"clients_per_round": 6}), 0) == list(range(6))
    assert len(participants(from_dict(BASE | {"clients_per_round": 0.4}), 0)) == 2  # 2.4 -> 2
    for value, pattern in [(0, "'clients_per_round' = 0: a count must be in 1..6"),
                           (1.5, "a fraction must be in \\(0, 1\\]"),
                           (7, "in 1..6")]:  # fmt: skip
        with pytest.raises(ConfigError, match=pattern):
            from_dict(BASE | {"clients_per_round": value})


def test_evaluation_schedule():
    cfg = from_dict(BASE | {"eval_every": 3})
    assert [evaluated(cfg, r, 7) for r in range(7)] == [False, False, True, False, False, True,
                                                         True]  # fmt: skip


needs_data = pytest.mark.skipif(not os.environ.get("FEDLEASE_DATA_DIR"),
                                reason="FEDLEASE_DATA_DIR not set")  # fmt: skip


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("method", ["fedlease", "fedit"])
def test_only_participants_train_and_enter_the_aggregate(method, monkeypatch):
    cfg = from_dict(BASE | {"method": method, "clients_per_round": 2, "eval_every": 2})
    seen = []
    kept_before = {}

    def spy_train_round(self, r, ids):
        kept_before[r] = [{k: v.clone() for k, v in st.items()} for st in self.transport.kept]
        aggregate = self.strategy.aggregate

        def record(r_, ups):
            seen.append((r_, sorted(ups)))
            return aggregate(r_, ups)

        self.strategy.aggregate = record
        try:
            return original(self, r, ids)
        finally:
            self.strategy.aggregate = aggregate

    original = RoundDriver.train_round
    monkeypatch.setattr(RoundDriver, "train_round", spy_train_round)
    fed = simulation(cfg, progress=False)
    summary = fed.run()
    rows = fed.rec.rows
    assert len(rows) == 4
    for r, row in enumerate(rows):
        warm = method == "fedlease" and r == 0  # FedLEASE's warm-up trains every client
        want = list(range(6)) if warm else participants(cfg, r)
        assert row["participants"] == want and (warm or len(want) == 2)
        assert seen[r] == (r, want)  # exactly the participants' uploads are aggregated
        for c in row["clients"]:
            if c["client"] in want:
                assert c["status"] == "ok" and c["train_loss"] is not None
            else:
                assert c["status"] == "idle" and c["train_loss"] is None
        assert row["evaluated"] == (r in (1, 3))
        assert math.isnan(row["mean_accuracy"]) != row["evaluated"]
    # an idle client's kept state does not change in a round without evaluation (round 2)
    after = kept_before.get(3)
    for cid in set(range(6)) - set(rows[2]["participants"]):
        for k, v in kept_before[2][cid].items():
            assert torch.equal(v, after[cid][k]), (cid, k)
    assert summary.rounds == 4 and 0 <= summary.final["mean"] <= 1


@pytest.mark.slow
@needs_data
def test_draws_survive_an_interruption_and_resume(tmp_path, monkeypatch):
    """Also: rounds not evaluated have a null mean in metrics.jsonl (strict JSON, no NaN), both
    in lines appended as the run goes and in the file a resumed run rewrites."""
    cfg = from_dict(BASE | {"method": "fedit", "clients_per_round": 0.5, "eval_every": 2})
    whole = run(cfg, tmp_path / "whole", progress=False)
    interrupted(lambda: run(cfg, tmp_path / "broken", progress=False), 2, monkeypatch)
    resumed = run(cfg, tmp_path / "broken", progress=False, resume=True)
    assert resumed.resumed_from_round == 2
    rows_a, rows_b = strict_rows(tmp_path / "whole"), strict_rows(tmp_path / "broken")
    for rows in (rows_a, rows_b):
        assert [r["evaluated"] for r in rows] == [False, True, False, True]
        assert all((r["mean_accuracy"] is None) != r["evaluated"] for r in rows)
    assert [r["participants"] for r in rows_a] == [r["participants"] for r in rows_b]
    assert [r["participants"] for r in rows_a] == [participants(cfg, r) for r in range(4)]
    assert resumed.final == whole.final and resumed.comm_bytes == whole.comm_bytes


def strict_rows(run_dir) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl``, read as a strict parser would (no NaN)."""
    return [strict_json(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
