"""``fedlease compare``: several methods on the identical partitions and seeds, side by side.

Each (method, seed) run goes to ``<output>/<method>-seed<seed>/`` with the usual artefacts and
checkpoints. Runs that already finished there (same resolved config) are reused and unfinished
ones resume, so an interrupted comparison continues where it stopped. The comparison's own files
(``OUTPUTS``) are listed in ``fedlease-compare.json``; one of those names holding a file no
comparison wrote stops it before any run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from . import checkpoint, results_json, rundir
from .config import (
    LABEL,
    METHODS,
    ConfigError,
    FLConfig,
    config_differences,
    load_yaml,
    metric_of,
    runtime,
    validate,
)
from .simulator import run

OUTPUTS = ("compare.json", "compare.md", "compare.png")
MANIFEST = "fedlease-compare.json"  # the comparison's own files, as a run's fedlease-run.json


def _method_list(methods: list[str]) -> list[str]:
    if not methods:
        raise ConfigError("--methods must name at least one method")
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r} (known: {', '.join(METHODS)})")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"methods repeat: {methods}")
    return methods


def run_name(method: str, seed: int) -> str:
    """The directory of one (method, seed) run under the comparison's output."""
    return f"{method}-seed{seed}"


def run_one(cfg: FLConfig, run_dir: Path, progress: bool) -> dict:
    """``cfg``'s summary in ``run_dir``: read if complete, resumed if checkpointed, else run."""
    config_path = run_dir / "config.yaml"
    if config_path.exists():
        differ = config_differences(load_yaml(config_path.read_text()), cfg.to_dict())
        if differ:
            raise ConfigError(f"{run_dir} holds a run with a different config ({'; '.join(differ)}"
                              "); choose another --output or delete it")  # fmt: skip
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    resume = (run_dir / checkpoint.DIR / checkpoint.META).exists()
    # the comparison's own run directory: what an unfinished run wrote is replaced, nothing else
    return run(cfg, run_dir, progress=progress, resume=resume, overwrite=True).to_dict()


def compare(
    cfg: FLConfig,
    methods: list[str],
    seeds: list[int],
    output: str | Path,
    progress: bool = True,
) -> dict:
    """Run every method for every seed; write and return ``compare.json``'s content."""
    out = Path(output)
    methods = _method_list(methods)
    if not seeds:
        raise ConfigError("--seeds must name at least one seed")
    if cfg.rounds == 0:
        raise ConfigError("config key 'rounds' = 0: a comparison needs at least one round")
    if len(set(seeds)) != len(seeds):  # one run counted twice would narrow the spread
        raise ConfigError(f"--seeds repeat: {','.join(map(str, seeds))}")
    run_cfgs = {(m, s): dataclasses.replace(cfg, method=m, seed=s) for m in methods for s in seeds}
    for run_cfg in run_cfgs.values():  # every run's, before any starts (the rest of the config
        validate(run_cfg, {"method", "seed"})  # was checked on loading, defaults forgiven)
    # Finished runs are only read (e.g. GPU runs tabulated on a laptop); a run still to do needs
    # the config's device, checked before any of them starts.
    if any(not (out / run_name(m, s) / "summary.json").exists() for m in methods for s in seeds):
        runtime(cfg)
    if (theirs := rundir.foreign(out, OUTPUTS, MANIFEST)) is not None:
        raise rundir.OutputError(f"output {str(out)!r} holds {theirs!r}, which no comparison "
                                 "wrote and this one would write over; choose another "
                                 "--output")  # fmt: skip
    table: dict[str, dict] = {}
    for method in methods:
        summaries = []
        for seed in seeds:
            summaries.append(run_one(run_cfgs[method, seed], out / run_name(method, seed),
                                     progress))  # fmt: skip
        table[method] = _method_row(summaries, [run_name(method, s) for s in seeds])
    result = {"methods": table, "seeds": list(seeds), "clients": list(cfg.clients),
              "metric": metric_of(cfg), "config": cfg.to_dict()}  # fmt: skip
    rundir.make(out)
    rundir.record(out, list(OUTPUTS), MANIFEST)  # listed first: a crash below leaves them ours
    (out / "compare.json").write_text(results_json.dumps(result, indent=2) + "\n")
    (out / "compare.md").write_text(markdown_table(result))
    plot_compare(out / "compare.png", result)
    return result


def task_f1(summary: dict) -> dict[str, float]:
    """Mean F1 over a run's clients per task, for the tasks scored with F1 (MRPC, QQP)."""
    scores: dict[str, list[float]] = {}
    for c in summary["final"]["per_client"]:
        if c.get("f1") is not None:
            scores.setdefault(c["task"], []).append(c["f1"])
    return {t: float(np.nanmean(v)) for t, v in scores.items()}


def _method_row(summaries: list[dict], runs: list[str]) -> dict:
    tasks = list(summaries[0]["final"]["per_task"])
    per_task = {
        t: [results_json.score(s["final"]["per_task"][t]) for s in summaries] for t in tasks
    }
    f1 = [task_f1(s) for s in summaries]
    means = [results_json.score(s["final"]["mean"]) for s in summaries]
    rounds = [max(s["rounds"], 1) for s in summaries]
    return {
        "per_task": {t: float(np.mean(v)) for t, v in per_task.items()},
        "per_task_std": {t: float(np.std(v)) for t, v in per_task.items()},
        "per_task_f1": {t: float(np.mean([f[t] for f in f1])) for t in f1[0]},
        "mean": float(np.mean(means)),
        "std": float(np.std(means)),
        "per_seed": means,
        "num_experts": [s["num_experts"] for s in summaries],
        "bytes_per_round": {
            d: float(np.mean([s["comm_bytes"][d] / n for s, n in zip(summaries, rounds)]))
            for d in ("up", "down")
        },
        "wall_s": float(sum(s["wall_s"] for s in summaries)),
        "runs": runs,
    }


def markdown_table(result: dict) -> str:
    """One row per method, one column per task (and its F1 where the task has one), the
    average score (accuracy, or ROUGE-1 for generation), communication per round and the wall
    time of the method's runs."""
    methods = result["methods"]
    first = next(iter(methods.values()))
    tasks = list(first["per_task"])
    f1_tasks = [t for t in tasks if t in first.get("per_task_f1", {})]
    seeds = result["seeds"]
    head = ["method", *tasks, *(f"{t} F1" for t in f1_tasks), "average",
            "comm / round (MB up + down)", "wall (s, all seeds)"]  # fmt: skip
    lines = [
        f"{LABEL[result.get('metric', 'accuracy')]} (%) on each client's held-out data (F1 in % "
        f"where named), mean ± std over "
        f"seeds {seeds}; {len(result['clients'])} clients.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    best = max(row["mean"] for row in methods.values())
    for name, row in methods.items():
        cells = [f"{100 * row['per_task'][t]:.1f} ± {100 * row['per_task_std'][t]:.1f}"
                 for t in tasks]  # fmt: skip
        cells += [f"{100 * row['per_task_f1'][t]:.1f}" for t in f1_tasks]
        avg = f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}"
        if row["mean"] == best:
            avg = f"**{avg}**"
        b = row["bytes_per_round"]
        comm = f"{(b['up'] + b['down']) / 1e6:.2f}"
        lines.append("| " + " | ".join([name, *cells, avg, comm, f"{row['wall_s']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def plot_compare(path: Path, result: dict) -> None:
    """Grouped bars: the score per task and on average, one colour per method, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["methods"]
    tasks = list(next(iter(methods.values()))["per_task"])
    groups = [*tasks, "average"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 0.3 * len(methods)), 4))
    for i, (name, row) in enumerate(methods.items()):
        vals = [row["per_task"][t] for t in tasks] + [row["mean"]]
        errs = [row["per_task_std"][t] for t in tasks] + [row["std"]]
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, vals, width, yerr=errs, label=name, capsize=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(LABEL[result.get("metric", "accuracy")])
    ax.set_ylim(0, 1)
    ax.set_title(f"Methods compared over seeds {result['seeds']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
