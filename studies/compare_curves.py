"""Mean accuracy after every round, per method (mean over seeds), from the runs of a
``fedlease compare`` output directory (``<dir>/<method>-seed<s>/metrics.jsonl``)::

    python studies/compare_curves.py runs/compare-glue4 --out docs/results/compare_rounds.png

``--at-round R`` prints instead a table of every method after round R (per task, mean ± std over
seeds); with ``--unfinished`` it also reads runs stopped before their last round that got to R::

    python studies/compare_curves.py runs/compare-lr1e-3 --at-round 3 --unfinished
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedlease.cli_args import BadInput, at_least, exit_on_user_error, output_file
from fedlease.fl.results_json import score


def runs(directory: Path, unfinished: bool = False) -> Iterator[tuple[str, list[dict]]]:
    """(method, the rows of its ``metrics.jsonl``) for each ``<method>-seed<s>`` run that
    finished (and, with ``unfinished``, each run stopped before its last round)."""
    for run in sorted(directory.glob("*-seed*")):
        path = run / "metrics.jsonl"
        if not (unfinished or (run / "summary.json").exists()) or not path.exists():
            continue
        try:
            rows = [json.loads(x) for x in path.read_text().splitlines()]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInput(f"{str(path)!r} is not a metrics file: {exc}") from None
        yield run.name.rsplit("-seed", 1)[0], rows


def curves(directory: Path) -> dict[str, list[float]]:
    """method -> mean accuracy per round, averaged over the seeds whose runs finished."""
    per_method: dict[str, list[list[float]]] = {}
    for method, rows in runs(directory):
        per_method.setdefault(method, []).append([score(r["mean_accuracy"]) for r in rows])
    return {m: np.mean(np.array(v), axis=0).tolist() for m, v in per_method.items()}


def at_round(directory: Path, r: int, unfinished: bool) -> dict[str, dict[str, list[float]]]:
    """method -> {task or "mean": one accuracy per seed} after round ``r``."""
    out: dict[str, dict[str, list[float]]] = {}
    for method, rows in runs(directory, unfinished):
        row = next((x for x in rows if x["round"] == r and x.get("evaluated", True)), None)
        if row is None:
            continue
        cells = out.setdefault(method, {})
        by_task: dict[str, list[float]] = {}
        for c in row["clients"]:
            by_task.setdefault(c["task"], []).append(score(c["accuracy"]))
        for task, accs in by_task.items():
            cells.setdefault(task, []).append(float(np.mean(accs)))
        cells.setdefault("mean", []).append(score(row["mean_accuracy"]))
    return out


def round_table(data: dict[str, dict[str, list[float]]], r: int) -> str:
    tasks = list(dict.fromkeys(t for cells in data.values() for t in cells if t != "mean"))
    lines = [f"| method (after round {r}) | " + " | ".join(tasks) + " | mean | seeds |",
             "|---" + "|---:" * (len(tasks) + 2) + "|"]  # fmt: skip
    for method, cells in sorted(data.items(), key=lambda kv: -np.mean(kv[1]["mean"])):

        def fmt(v):
            return f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}"

        lines.append(f"| {method} | " + " | ".join(fmt(cells[t]) for t in tasks)
                     + f" | {fmt(cells['mean'])} | {len(cells['mean'])} |")  # fmt: skip
    return "\n".join(lines)


def read_runs(args):
    """The table after ``--at-round``, or the curves; ``BadInput`` when there is nothing to show."""
    if not args.directory.is_dir():
        raise BadInput(f"{str(args.directory)!r} is not a directory")
    if args.at_round is not None:
        table = at_round(args.directory, args.at_round, args.unfinished)
        if not table:
            raise BadInput(f"no run in {args.directory} reached round {args.at_round}")
        return table
    if args.out is None:
        raise BadInput("--out PNG is needed to plot the curves (or ask --at-round R)")
    data = curves(args.directory)
    if not data:
        raise BadInput(f"no finished runs in {args.directory}")
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path, help="a fedlease compare output directory")
    p.add_argument("--out", type=output_file, help="PNG to write (the curves)")
    p.add_argument("--at-round", type=at_least(0), help="print a table after this round instead")
    p.add_argument("--unfinished", action="store_true",
                   help="with --at-round: also runs stopped before their last round")  # fmt: skip
    args = p.parse_args(argv)
    with exit_on_user_error("compare_curves.py"):
        data = read_runs(args)
    if args.at_round is not None:
        print(round_table(data, args.at_round))
        return 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, acc in sorted(data.items(), key=lambda kv: -kv[1][-1]):
        ax.plot(range(1, len(acc) + 1), acc, marker="o", ms=3, label=f"{method} ({acc[-1]:.3f})")
    ax.set_xlabel("round")
    ax.set_ylabel("mean accuracy over clients")
    ax.set_title("Accuracy after each round (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    for method, acc in data.items():
        print(method, " ".join(f"{a:.3f}" for a in acc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
