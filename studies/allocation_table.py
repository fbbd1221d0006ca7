"""The allocation FedLEASE makes from finished warm-ups, as a table: per run, the K the silhouette
picks, the assignment and its adjusted Rand index against the clients' tasks.

Reads runs written by ``fedlease run`` (``config.yaml`` and ``adapters/client<i>/``, e.g. the
``alloc*`` runs of ``studies/glue_study.sh``) and clusters their warm-up B matrices with the
library's own code (``fedlease.fl.allocation``). ``--layers`` restricts the distance to some
layers' B (a study of which layers carry the task; the paper uses all of them)::

    python studies/allocation_table.py runs/study/runs/alloc8-seed* [--layers 3,4,5] [--json F]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import yaml
from safetensors.torch import load_file
from sklearn.metrics import adjusted_rand_score

from fedlease.cli_args import (
    BadInput,
    at_least,
    exit_on_user_error,
    int_list,
    name_list,
    output_file,
)
from fedlease.fl.allocation import allocate, b_distance_matrix


def run_config(run: Path) -> dict:
    """The ``config.yaml`` of a run directory; ``BadInput`` when ``run`` is not one."""
    path = run / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        why = getattr(exc, "strerror", None) or type(exc).__name__
        raise BadInput(
            f"{str(run)!r} is not a fedlease run directory (config.yaml: {why})"
        ) from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("clients"), list):
        raise BadInput(f"{str(path)!r} has no list of clients")
    return cfg


def warmup_b(run: Path, clients: list, layers: set[int] | None, modules: set[str] | None) -> list:
    """Each client's lora_B tensors (optionally only some layers / target modules)."""
    states = []
    for i in range(len(clients)):
        path = run / "adapters" / f"client{i}" / "adapter_model.safetensors"
        if not path.is_file():
            raise BadInput(f"{str(run)!r} has no adapter of client {i} ({path} is missing)")
        keep = {}
        for key, t in load_file(path).items():
            if not key.endswith(".lora_B"):
                continue
            layer = re.search(r"\.layers?\.(\d+)\.", key)
            if layers is not None and (layer is None or int(layer.group(1)) not in layers):
                continue
            if modules is not None and key.split(".")[-2] not in modules:
                continue
            keep[key] = t
        if not keep:
            raise BadInput(f"{str(run)!r}: no lora_B left after --layers/--modules")
        states.append(keep)
    return states


def row(run: Path, layers: set[int] | None, modules: set[str] | None, max_experts: int) -> dict:
    cfg = run_config(run)
    tasks = cfg["clients"]
    d = b_distance_matrix(warmup_b(run, tasks, layers, modules))
    try:
        alloc = allocate(d, max_experts)
    except ValueError as exc:  # fewer than three clients
        raise BadInput(f"{str(run)!r}: {exc}") from None
    same = [d[i, j] for i in range(len(tasks)) for j in range(i) if tasks[i] == tasks[j]]
    cross = [d[i, j] for i in range(len(tasks)) for j in range(i) if tasks[i] != tasks[j]]
    return {
        "run": run.name,
        "seed": cfg["seed"],
        "tasks": tasks,
        "k": alloc.num_experts,
        "silhouette": alloc.silhouette,
        "assignment": alloc.assignment,
        "ari": float(adjusted_rand_score(tasks, alloc.assignment)),
        "same_task_mean": float(np.mean(same)),
        "same_task_max": float(np.max(same)),
        "cross_task_mean": float(np.mean(cross)),
        "cross_task_min": float(np.min(cross)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (config.yaml + adapters/)")
    p.add_argument("--layers", type=int_list(0),
                   help="comma-separated layer indices whose B enter the distance")  # fmt: skip
    p.add_argument("--modules", type=name_list(None),
                   help="comma-separated target modules, e.g. value")  # fmt: skip
    p.add_argument("--max-experts", type=at_least(2), default=4,
                   help="largest K tried (as the config; default: 4)")  # fmt: skip
    p.add_argument("--json", type=output_file, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    layers = set(args.layers) if args.layers else None
    modules = set(args.modules) if args.modules else None
    runs = sorted(
        args.runs, key=lambda r: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", r.name)]
    )  # seed2 < seed10
    with exit_on_user_error("allocation_table.py"):
        rows = [row(r, layers, modules, args.max_experts) for r in runs]
    print("| run | K (silhouette per K) | assignment | ARI | same-task mean / max | "
          "cross-task mean / min |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        sil = " / ".join(f"{v:.2f}" for v in r["silhouette"].values())
        print(f"| {r['run']} | {r['k']} ({sil}) | {' '.join(map(str, r['assignment']))} | "
              f"{r['ari']:.2f} | {r['same_task_mean']:.2f} / {r['same_task_max']:.2f} | "
              f"{r['cross_task_mean']:.2f} / {r['cross_task_min']:.2f} |")  # fmt: skip
    hits = sum(r["ari"] == 1.0 for r in rows)
    print(f"\nadjusted Rand 1.0 in {hits} of {len(rows)} runs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
