"""Robust aggregation and the server's check of uploads.

``aggregation`` in a config picks how the server combines the uploads that enter one aggregate
(FedLEASE: the members of one cluster, for expert k and router k; the baselines: every
participant, for their shared tensors):

* ``mean``: the sample-weighted mean (the default; FedAvg).
* ``median``: the coordinate-wise median (the mean of the two middle values for an even count),
  unweighted, as Flower's FedMedian.
* ``trimmed_mean``: per coordinate, the ``trim`` fraction of the largest and of the smallest
  values dropped (``floor(trim * n)`` each), the rest averaged, unweighted, as FedTrimmedAvg.
* ``norm_clip``: each upload's distance from the coordinate-wise median (all its tensors as one
  vector) clipped to ``clip`` times the median of those distances, then the sample-weighted mean
  of the clipped uploads (centered clipping around a robust center: a huge or sign-flipped upload
  moves the result by at most the typical spread).
* ``krum``: Multi-Krum (Blanchard et al., NeurIPS 2017): each upload (all its tensors as one
  vector) is scored by its summed squared distance to its ``n - byzantine - 2`` nearest others
  (at least one), and the sample-weighted mean of the ``n - byzantine`` best-scored uploads is the
  result. An upload pointing away from the others (a sign flip) or far out (scaled) scores worst
  and is left out whole, so the rest are averaged unbiased; with two uploads or fewer there is
  nothing to compare and it is the mean.

Written as ``aggregation: median`` or ``aggregation: {rule: trimmed_mean, trim: 0.25}``.

``validate_upload`` is the check every upload passes before it can enter an aggregate: the names,
shapes and dtypes the server expects, finite values; ``norm_outliers`` adds the optional bound
``max_norm_ratio``: an upload whose norm exceeds that many times the median norm of the uploads
that aggregate with it is rejected.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .allocation import average
from .faults import non_finite
from .types import State

RULES = ("mean", "median", "trimmed_mean", "norm_clip", "krum")
AGGREGATION_KEYS = {"rule": str, "trim": float, "clip": float, "byzantine": int}


class AggregationError(ValueError):
    """A bad ``aggregation`` setting."""


@dataclass(frozen=True)
class Aggregation:
    rule: str = "mean"
    trim: float = 0.2  # trimmed_mean: the fraction dropped at each end, per coordinate
    clip: float = 1.0  # norm_clip: the bound, in medians of the distance to the median
    byzantine: int = 1  # krum: attackers tolerated per aggregate (that many uploads are dropped)

    @staticmethod
    def from_config(value: str | dict | None) -> Aggregation:
        if value is None:
            return Aggregation()
        if isinstance(value, str):
            value = {"rule": value}
        if not isinstance(value, dict):
            raise AggregationError(
                f"config key 'aggregation' must be a rule name or a mapping, got {value!r}"
            )
        for key, v in value.items():
            if key not in AGGREGATION_KEYS:
                raise AggregationError(f"unknown config key 'aggregation.{key}' (known: "
                                       f"{', '.join(AGGREGATION_KEYS)})")  # fmt: skip
            want = AGGREGATION_KEYS[key]
            if not (isinstance(v, want) or (want is float and isinstance(v, int))) or isinstance(
                v, bool
            ):
                raise AggregationError(
                    f"config key 'aggregation.{key}' must be {want.__name__}, got {v!r}"
                )
        agg = Aggregation(**{k: (float(v) if AGGREGATION_KEYS[k] is float else v)
                             for k, v in value.items()})  # fmt: skip
        if agg.rule not in RULES:
            raise AggregationError(
                f"config key 'aggregation.rule' = {agg.rule!r}: choose from {', '.join(RULES)}"
            )
        if not 0.0 <= agg.trim < 0.5:
            raise AggregationError(f"config key 'aggregation.trim' = {agg.trim!r}: must be in "
                                   "[0, 0.5)")  # fmt: skip
        if not agg.clip > 0:
            raise AggregationError(f"config key 'aggregation.clip' = {agg.clip!r}: must be > 0")
        if agg.byzantine < 0:
            raise AggregationError(
                f"config key 'aggregation.byzantine' = {agg.byzantine!r}: must be >= 0"
            )
        return agg

    def __call__(self, ups: list[State], weights: list[float]) -> State:
        """The combination of ``ups`` (same keys and shapes) under this rule."""
        if self.rule == "mean" or len(ups) == 1:
            return {k: average([u[k] for u in ups], weights) for k in ups[0]}
        if self.rule == "median":
            return {k: coordinate_median([u[k] for u in ups]) for k in ups[0]}
        if self.rule == "trimmed_mean":
            return {k: trimmed_mean([u[k] for u in ups], self.trim) for k in ups[0]}
        if self.rule == "krum":
            keep = multi_krum(ups, self.byzantine)
            return {k: average([ups[i][k] for i in keep], [weights[i] for i in keep])
                    for k in ups[0]}  # fmt: skip
        return clipped_mean(ups, weights, self.clip)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.double() for t in tensors])


def coordinate_median(tensors: list[torch.Tensor]) -> torch.Tensor:
    s = _stack(tensors).sort(dim=0).values
    n = len(tensors)
    mid = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return mid.to(tensors[0].dtype)


def trimmed_mean(tensors: list[torch.Tensor], trim: float) -> torch.Tensor:
    n = len(tensors)
    cut = math.floor(trim * n)
    if n - 2 * cut < 1:
        cut = (n - 1) // 2
    s = _stack(tensors).sort(dim=0).values
    return s[cut : n - cut].mean(0).to(tensors[0].dtype)


def multi_krum(ups: list[State], byzantine: int) -> list[int]:
    """Indices of the uploads Multi-Krum keeps: the ``n - byzantine`` (at least one) with the
    smallest sums of squared distances to their ``n - byzantine - 2`` (at least one) nearest
    other uploads; all of them when there are two or fewer. Ties keep the lower index."""
    n = len(ups)
    if n <= 2:
        return list(range(n))
    flat = torch.stack([torch.cat([u[k].double().reshape(-1) for k in ups[0]]) for u in ups])
    dist = torch.cdist(flat, flat).square()
    dist.fill_diagonal_(float("inf"))
    neighbours = max(1, n - byzantine - 2)
    scores = dist.sort(dim=1).values[:, :neighbours].sum(dim=1)
    keep = max(1, n - byzantine)
    order = sorted(range(n), key=lambda i: (float(scores[i]), i))
    return sorted(order[:keep])


def clipped_mean(ups: list[State], weights: list[float], clip: float) -> State:
    keys = list(ups[0])
    center = {k: coordinate_median([u[k] for u in ups]).double() for k in keys}
    deltas = [{k: u[k].double() - center[k] for k in keys} for u in ups]
    norms = torch.tensor([upload_norm(d) for d in deltas])
    bound = clip * float(norms.median())
    scales = [1.0 if n <= bound or n == 0 else bound / n for n in norms.tolist()]
    w = torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).tolist()
    out = {}
    for k in keys:
        moved = sum(wi * s * d[k] for wi, s, d in zip(w, scales, deltas))
        out[k] = (center[k] + moved).to(ups[0][k].dtype)
    return out


def validate_upload(expected: State, upload: State) -> str | None:
    """Why ``upload`` does not match ``expected`` (names, shapes, dtypes) or holds NaN/Inf;
    None when it is acceptable."""
    missing = [k for k in expected if k not in upload]
    extra = [k for k in upload if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if extra:
            parts.append(f"unexpected {extra[:3]}")
        return "wrong tensors: " + ", ".join(parts)
    for k, want in expected.items():
        got = upload[k]
        if not isinstance(got, torch.Tensor):
            return f"{k}: not a tensor ({type(got).__name__})"
        if tuple(got.shape) != tuple(want.shape):
            return f"{k}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if got.dtype != want.dtype:
            return f"{k}: dtype {str(got.dtype).removeprefix('torch.')}, expected " + str(
                want.dtype
            ).removeprefix("torch.")
    bad = non_finite(upload)
    if bad:
        return f"non-finite values in {bad[:3]}"
    return None


def upload_norm(upload: State) -> float:
    return math.sqrt(sum(float(v.double().square().sum()) for v in upload.values()))


def norm_outliers(
    uploads: dict[int, State], groups: dict[int, int], ratio: float | None
) -> dict[int, str]:
    """Client id -> reason, for the uploads whose norm exceeds ``ratio`` times the median norm of
    their group (the uploads that aggregate together); groups of fewer than 3 are not judged."""
    if ratio is None:
        return {}
    out = {}
    for g in set(groups.values()):
        members = [c for c in uploads if groups.get(c) == g]
        if len(members) < 3:
            continue
        norms = {c: upload_norm(uploads[c]) for c in members}
        median = float(torch.tensor(list(norms.values())).median())
        for c, n in norms.items():
            if n > ratio * median:
                out[c] = f"norm {n:.4g} > {ratio:g} x the median {median:.4g} of its group"
    return out


def screen_uploads(strategy, r: int, ups: dict[int, State], max_norm_ratio: float | None
                   ) -> tuple[dict[int, State], dict[int, str]]:  # fmt: skip
    """The server's check of round ``r``'s uploads (client id -> upload): ``(accepted, rejected)``
    with the reason per rejected client. Each upload must match what the strategy expects
    (``check_upload``); then, with ``max_norm_ratio``, none may exceed that many times the median
    norm of the uploads of its group (``group_of``)."""
    rejected = {}
    for cid, upload in ups.items():
        why = strategy.check_upload(cid, r, upload)
        if why is not None:
            rejected[cid] = why
    valid = {c: u for c, u in ups.items() if c not in rejected}
    groups = {c: strategy.group_of(c, r, u) for c, u in valid.items()}
    rejected.update(norm_outliers(valid, groups, max_norm_ratio))
    return {c: u for c, u in ups.items() if c not in rejected}, rejected


def screen_round(strategy, r: int, ups: dict[int, State], statuses, max_norm_ratio) -> dict:
    """``screen_uploads``, then each rejected client's status marked ``rejected`` with its
    ``reason`` (and a warning); returns the accepted uploads. Both drivers call this."""
    accepted, rejected = screen_uploads(strategy, r, ups, max_norm_ratio)
    for cid, why in sorted(rejected.items()):
        warnings.warn(f"round {r}: rejected client {cid}'s upload: {why}", stacklevel=2)
        statuses[cid].update(status="rejected", reason=why)
    return accepted


__all__ = [
    "RULES",
    "Aggregation",
    "AggregationError",
    "multi_krum",
    "norm_outliers",
    "screen_round",
    "screen_uploads",
    "upload_norm",
    "validate_upload",
]
