"""Mean accuracy after every round, per method (mean over seeds), from the runs of a
``fedlease compare`` output directory (``<dir>/<method>-seed<s>/metrics.jsonl``)::

    python benchmarks/compare_curves.py runs/compare-glue4 --out docs/results/compare_rounds.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def curves(directory: Path) -> dict[str, list[float]]:
    """method -> mean accuracy per round, averaged over the seeds whose runs finished."""
    per_method: dict[str, list[list[float]]] = {}
    for run in sorted(directory.glob("*-seed*")):
        if not (run / "summary.json").exists():
            continue
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        method = run.name.rsplit("-seed", 1)[0]
        per_method.setdefault(method, []).append([r["mean_accuracy"] for r in rows])
    return {m: np.mean(np.array(v), axis=0).tolist() for m, v in per_method.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path, help="a fedlease compare output directory")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args(argv)
    data = curves(args.directory)
    if not data:
        raise SystemExit(f"no finished runs in {args.directory}")
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
    fig.savefig(args.out, dpi=120)
    for method, acc in data.items():
        print(method, " ".join(f"{a:.3f}" for a in acc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
