"""Expert allocation: client distances from LoRA B matrices, clustering, expert initialisation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def b_distance_matrix(states: list[dict[str, torch.Tensor]]) -> np.ndarray:
    """``D[i, j]`` = mean over every ``*.lora_B`` tensor of ``1 - cos(B_i, B_j)`` (flattened).

    The mean runs over layers and target modules alike. A is not used (as in the paper).
    """
    keys = sorted(k for k in states[0] if k.endswith(".lora_B"))
    if not keys:
        raise ValueError("no lora_B tensors in the client states")
    n = len(states)
    total = np.zeros((n, n))
    for key in keys:
        flat = torch.stack([s[key].reshape(-1).double() for s in states])
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        total += (1.0 - unit @ unit.t()).numpy()
    d = total / len(keys)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return np.clip(d, 0.0, None)


@dataclass
class Allocation:
    num_experts: int
    assignment: list[int]  # expert index per client
    silhouette: dict[int, float]  # K -> silhouette score (empty when K was fixed)
    distance_matrix: np.ndarray


def _relabel(labels: np.ndarray) -> list[int]:
    """Number clusters by first appearance: client 0's cluster is expert 0, and so on."""
    order: dict[int, int] = {}
    return [order.setdefault(int(c), len(order)) for c in labels]


def cluster(distance: np.ndarray, k: int) -> list[int]:
    """Agglomerative clustering with average linkage on a precomputed distance matrix."""
    if k == 1:
        return [0] * len(distance)
    if k == len(distance):
        return list(range(k))
    from sklearn.cluster import AgglomerativeClustering  # see allocate()

    model = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average")
    return _relabel(model.fit_predict(distance))


def allocate(distance: np.ndarray, max_experts: int, num_experts: int | str = "auto") -> Allocation:
    """Fixed ``num_experts``, or the K in 2..max_experts (at most n-1) with the best silhouette."""
    # scikit-learn is imported where it is used: clients never cluster, and importing it (with
    # scipy.stats and pandas) cost 2.5 s in every Flower ClientApp process, one per message.
    from sklearn.metrics import silhouette_score

    n = len(distance)
    if num_experts != "auto":
        return Allocation(int(num_experts), cluster(distance, int(num_experts)), {}, distance)
    scores: dict[int, float] = {}
    best: tuple[float, int, list[int]] | None = None
    for k in range(2, min(max_experts, n - 1) + 1):
        labels = cluster(distance, k)
        scores[k] = float(silhouette_score(distance, labels, metric="precomputed"))
        if best is None or scores[k] > best[0]:  # ties keep the smaller K
            best = (scores[k], k, labels)
    if best is None:
        raise ValueError(f"cannot choose a number of experts for {n} clients")
    return Allocation(best[1], best[2], scores, distance)


def average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Weighted mean (weights need not sum to 1), computed in float32 or wider."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    acc = sum(t.double() * wi for t, wi in zip(tensors, w.tolist()))
    return acc.to(tensors[0].dtype)


def init_experts(
    warm_states: list[dict[str, torch.Tensor]],
    assignment: list[int],
    weights: list[float],
) -> dict[str, torch.Tensor]:
    """Stacked expert tensors: ``lora_A (K, r, in)``, ``lora_B (K, out, r)`` per layer, expert k
    the weighted average of its members' warm-up (single-expert) adapters."""
    k_total = max(assignment) + 1
    out = {}
    for key in warm_states[0]:
        if not key.endswith((".lora_A", ".lora_B")):
            continue
        rows = []
        for k in range(k_total):
            members = [i for i, a in enumerate(assignment) if a == k]
            rows.append(
                average([warm_states[i][key][0] for i in members], [weights[i] for i in members])
            )
        out[key] = torch.stack(rows)
    return out
