"""Pictures of a run: dendrogram, distance heatmap, silhouette per K, accuracy per round."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy.cluster.hierarchy import dendrogram, linkage
from scipy.spatial.distance import squareform

from .allocation import Allocation
from .config import LABEL


def _labels(tasks: list[str]) -> list[str]:
    return [f"{i}:{t}" for i, t in enumerate(tasks)]


# Beyond this many clients the per-client plots drop their per-client labels and stop growing: a
# figure sized per client reached tens of gigabytes of pixels at 1,000 clients.
LABEL_LIMIT = 40
MAX_INCHES = 14.0


def _side(n: int, per_client: float, least: float) -> float:
    return min(MAX_INCHES, max(least, n * per_client))


def plot_dendrogram(path: Path, alloc: Allocation, tasks: list[str]) -> None:
    n = len(tasks)
    fig, ax = plt.subplots(figsize=(_side(n, 0.5, 5), 4))
    z = linkage(squareform(alloc.distance_matrix, checks=False), method="average")
    if n <= LABEL_LIMIT:
        dendrogram(z, labels=_labels(tasks), ax=ax, leaf_rotation=90)
    else:  # the last merges only; a leaf shows how many clients it holds
        dendrogram(z, ax=ax, truncate_mode="lastp", p=LABEL_LIMIT, leaf_rotation=90)
        ax.set_xlabel(f"{n} clients (the top {LABEL_LIMIT} clusters; leaf labels: clients)")
    ax.set_ylabel("1 - cos(B) (average linkage)")
    ax.set_title(f"Client clustering: {alloc.num_experts} experts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_heatmap(path: Path, alloc: Allocation, tasks: list[str]) -> None:
    n = len(tasks)
    fig, ax = plt.subplots(figsize=(_side(n, 0.45, 4) + 1.5, _side(n, 0.45, 3.5)))
    if n <= LABEL_LIMIT:
        im = ax.imshow(alloc.distance_matrix, cmap="viridis")
        ax.set_xticks(range(n), _labels(tasks), rotation=90)
        ax.set_yticks(
            range(n), [f"{lab} -> E{a}" for lab, a in zip(_labels(tasks), alloc.assignment)]
        )
    else:  # clients ordered by expert, then task: the clusters show as blocks
        order = sorted(range(n), key=lambda i: (alloc.assignment[i], tasks[i], i))
        d = np.asarray(alloc.distance_matrix)[np.ix_(order, order)]
        im = ax.imshow(d, cmap="viridis", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{n} clients, ordered by expert then task")
    fig.colorbar(im, ax=ax, label="1 - cos(B)")
    ax.set_title("Client distance (LoRA B)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_silhouette(path: Path, alloc: Allocation) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    if alloc.silhouette:
        ks = sorted(alloc.silhouette)
        ax.plot(ks, [alloc.silhouette[k] for k in ks], "o-")
        ax.axvline(alloc.num_experts, color="gray", ls="--", label=f"chosen K={alloc.num_experts}")
        ax.set_xticks(ks)
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"K fixed at {alloc.num_experts}", ha="center", va="center")
    ax.set_xlabel("number of experts K")
    ax.set_ylabel("silhouette score")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy(path: Path, rows: list[dict], initial_mean: float | None = None) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    warm = sum(1 for r in rows if r["phase"] == "warmup")
    rows = [r for r in rows if r.get("evaluated", True)]  # eval_every > 1 skips rounds
    rounds = [r["round"] + 1 for r in rows]
    tasks = sorted({c["task"] for c in rows[0]["clients"]}) if rows else []
    metric = rows[0].get("metric", "accuracy") if rows else "accuracy"
    for t in tasks:
        acc = [np.mean([c[metric] for c in r["clients"] if c["task"] == t]) for r in rows]
        ax.plot(rounds, acc, marker=".", label=t)
    ax.plot(rounds, [r[f"mean_{metric}"] for r in rows], "k-", lw=2, label="mean")
    if initial_mean is not None:
        ax.axhline(initial_mean, color="gray", ls=":", label="untrained (mean)")
    if warm:
        ax.axvspan(0.5, warm + 0.5, color="gray", alpha=0.15, label="warm-up")
    ax.set_xlabel("round")
    ax.set_ylabel(f"{LABEL[metric]} (held-out)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(
    out: Path,
    alloc: Allocation | None,
    rows: list[dict],
    tasks: list[str],
    initial_mean: float | None = None,
) -> None:
    if alloc is not None:  # methods without a client clustering get the accuracy plot only
        plot_dendrogram(out / "dendrogram.png", alloc, tasks)
        plot_heatmap(out / "distance_heatmap.png", alloc, tasks)
        plot_silhouette(out / "silhouette.png", alloc)
    if rows:
        plot_accuracy(out / "accuracy.png", rows, initial_mean)
