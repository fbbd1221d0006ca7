"""Results files are strict JSON: a score that is not a finite number is written as null and
read back as NaN."""

import json
import math

import pytest
from helpers import strict_json

from fedlease.fl import results_json
from fedlease.fl.compare import _method_row


def test_non_finite_numbers_are_written_as_null_at_any_depth():
    row = {"mean_accuracy": math.nan, "wall_s": 1.5, "rounds": 3, "name": "nan",
           "clients": [{"accuracy": math.inf, "f1": 0.25}, (math.nan, -math.inf, 2.0)],
           "flag": True, "missing": None}  # fmt: skip
    back = strict_json(results_json.dumps(row))
    assert back == {"mean_accuracy": None, "wall_s": 1.5, "rounds": 3, "name": "nan",
                    "clients": [{"accuracy": None, "f1": 0.25}, [None, None, 2.0]],
                    "flag": True, "missing": None}  # fmt: skip
    assert isinstance(back["rounds"], int) and back["flag"] is True  # bool is not a float
    assert row["mean_accuracy"] != row["mean_accuracy"]  # the caller's object is left as it was


def test_a_null_score_reads_back_as_nan():
    assert math.isnan(results_json.score(None))
    assert results_json.score(0.5) == 0.5 and results_json.score(1) == 1.0


def summary(mean, per_task):
    """A finished run's summary.json as a comparison reads it."""
    return {"final": {"mean": mean, "per_task": per_task, "per_client": []}, "rounds": 2,
            "num_experts": 2, "comm_bytes": {"up": 10, "down": 20}, "wall_s": 3.0}  # fmt: skip


def test_a_comparison_reads_a_run_whose_scores_are_null():
    """A run whose clients of one task never reported (Flower) wrote that task's score as null:
    the comparison's row counts it as NaN, as it did the NaN that was written before."""
    done = json.loads(results_json.dumps(summary(math.nan, {"sst2": math.nan, "mrpc": 0.75})))
    row = _method_row([done, summary(0.5, {"sst2": 0.5, "mrpc": 0.25})], ["a", "b"])
    assert math.isnan(row["per_task"]["sst2"]) and math.isnan(row["mean"])
    assert row["per_task"]["mrpc"] == pytest.approx(0.5)
