"""``studies/compare_curves.py --at-round``: the table of methods part-way through their runs."""

import json
from pathlib import Path

import pytest
from helpers import load_script


@pytest.fixture(scope="module")
def curves():
    return load_script("studies/compare_curves.py")


def _run(root: Path, name: str, rounds: list[dict[str, list[float]]], finished: bool) -> None:
    """A run directory whose round r evaluates clients with the given accuracies per task."""
    run = root / name
    run.mkdir()
    lines = []
    for r, per_task in enumerate(rounds):
        clients = [{"task": t, "accuracy": a} for t, accs in per_task.items() for a in accs]
        mean = sum(c["accuracy"] for c in clients) / len(clients)
        lines.append(json.dumps({"round": r, "evaluated": True, "mean_accuracy": mean,
                                 "clients": clients}))  # fmt: skip
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        (run / "summary.json").write_text("{}")


def test_at_round_averages_clients_per_task_then_seeds(curves, tmp_path):
    _run(tmp_path, "a-seed1", [{"x": [0.5, 0.7], "y": [0.2]}, {"x": [0.9, 0.7], "y": [0.4]}], True)
    _run(tmp_path, "a-seed2", [{"x": [0.6, 0.6], "y": [0.3]}], False)  # stopped after round 0
    _run(tmp_path, "b-seed1", [{"x": [0.1, 0.1], "y": [0.1]}, {"x": [0.2, 0.2], "y": [0.9]}], True)
    finished = curves.at_round(tmp_path, 0, unfinished=False)
    assert finished["a"]["x"] == [pytest.approx(0.6)] and finished["a"]["y"] == [0.2]
    both = curves.at_round(tmp_path, 0, unfinished=True)
    assert both["a"]["x"] == [pytest.approx(0.6), pytest.approx(0.6)]
    assert both["a"]["mean"] == [pytest.approx(1.4 / 3), pytest.approx(1.5 / 3)]
    later = curves.at_round(tmp_path, 1, unfinished=True)  # a-seed2 never reached round 1
    assert len(later["a"]["mean"]) == 1 and later["a"]["x"] == [pytest.approx(0.8)]
    table = curves.round_table(later, 1).splitlines()
    assert table[0] == "| method (after round 1) | x | y | mean | seeds |"
    assert table[2].startswith("| a | 80.0 ± 0.0 | 40.0 ± 0.0 |")  # a (mean 0.667) above b (0.433)
    assert table[3].startswith("| b | 20.0 ± 0.0 | 90.0 ± 0.0 |") and table[3].endswith("| 1 |")
