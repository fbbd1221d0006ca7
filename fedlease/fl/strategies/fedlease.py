"""FedLEASE (Wang et al., NeurIPS 2025) and its ablations.

1. Warm-up (``warmup_rounds``): one plain LoRA per client, trained locally (the paper), or FedAvg'd
   each round with ``warmup_aggregate: true``.
2. Allocation, before the first adaptive round: every client uploads its LoRA; the server
   clusters clients by their B matrices (average linkage, K by silhouette, or fixed) and builds
   expert k as the sample-weighted mean of cluster k's adapters.
3. Adaptive rounds: all K experts and the cluster's router go down; the client trains its own
   expert, the router and its head, and sends up its own expert and the router; the server
   averages expert k and router k over cluster k's accepted uploads (a cluster with none keeps
   its previous ones). Heads stay local.

Ablations (same everything else): ``fedlease_topk`` routes with a fixed top-``top_k`` over K
slots instead of adaptive top-M over 2K-1; ``fedlease_fixed_k`` uses K = ``max_experts`` without
the silhouette search; ``fedlease_random`` keeps the chosen K and cluster sizes but assigns
clients to experts at random (seeded).
"""

from __future__ import annotations

import numpy as np
import torch

from ..allocation import Allocation, allocate, b_distance_matrix, init_experts
from ..checkpoint import CheckpointError
from ..robust import Aggregation
from ..types import TrainSpec
from .base import (
    Layout,
    State,
    Strategy,
    checked_choices,
    is_expert,
    is_router,
    restored,
    select,
    weighted_mean,
)


class FedLEASE(Strategy):
    name = "fedlease"
    routing = "adaptive"
    fixed_k = False
    random_assignment = False

    def __init__(self, cfg, weights):
        super().__init__(cfg, weights)
        self.alloc: Allocation | None = None

    def layout(self, r):
        if r < self.cfg.warmup_rounds or self.alloc is None:
            return Layout()
        k = self.alloc.num_experts
        top_k = min(self.cfg.top_k, k) if self.routing == "topk" else None
        return Layout(k, self.routing, top_k)

    def phase(self, r):
        return "warmup" if r < self.cfg.warmup_rounds else "adaptive"

    def samples(self, r):
        """The warm-up rounds train every client: the allocation clusters every client's warm-up
        B, so each must have trained one; sampling starts with the adaptive rounds. Measured
        against sampled warm-ups that wait for every client, or place late clients by their
        nearest cluster: same clusters, but only this places every client at a fixed round
        (docs/results/participation.md)."""
        return r >= self.cfg.warmup_rounds

    def training(self, r):
        """Warm-up with ``warmup_optimizer`` at ``warmup_lr``, class-balanced loss when
        ``warmup_class_balanced``, dropout only with ``warmup_dropout``: the allocation compares
        the B matrices the warm-up leaves, which should estimate each client's expected gradient.
        Plain SGD keeps B a sum of gradients (AdamW's per-coordinate scaling fills it with
        noise), balancing removes the pull towards each client's majority label (shared across
        tasks), and without dropout the sum is far less noisy (docs/results/allocation.md)."""
        if r < self.cfg.warmup_rounds:
            cfg = self.cfg
            return TrainSpec(cfg.warmup_optimizer, cfg.warmup_lr, cfg.weight_decay,
                             cfg.warmup_class_balanced, cfg.warmup_dropout,
                             cfg.warmup_average_b)  # fmt: skip
        return None

    def setup(self, template):
        super().setup(template)
        self.warm_global = select(template(Layout()), is_expert)

    # -- allocation ----------------------------------------------------------------------------
    def collect(self, r):
        return is_expert if r == self.cfg.warmup_rounds and self.alloc is None else None

    def on_collect(self, r, uploads):
        cfg = self.cfg
        num = cfg.max_experts if self.fixed_k else cfg.num_experts
        alloc = allocate(b_distance_matrix(uploads), cfg.max_experts, num)
        if self.random_assignment:
            perm = np.random.default_rng(cfg.seed).permutation(self.n)
            alloc.assignment = [alloc.assignment[i] for i in perm]
        self.alloc = alloc
        self.experts = init_experts(uploads, alloc.assignment, self.weights)
        routers = select(self.template(self.layout(r)), is_router)
        self.routers = [
            {k: v.clone() for k, v in routers.items()} for _ in range(alloc.num_experts)
        ]

    # -- rounds --------------------------------------------------------------------------------
    def down(self, cid, r, final=False):
        if r < self.cfg.warmup_rounds:
            return dict(self.warm_global) if self.cfg.warmup_aggregate else {}
        return {**self.experts, **self.routers[self.alloc.assignment[cid]]}

    def own_expert(self, cid, r):
        return None if r < self.cfg.warmup_rounds else self.alloc.assignment[cid]

    def up(self, cid, r, new):
        if r < self.cfg.warmup_rounds:
            return select(new, is_expert) if self.cfg.warmup_aggregate else {}
        own = self.alloc.assignment[cid]
        return {k: (v[own] if is_expert(k) else v)
                for k, v in new.items() if is_expert(k) or is_router(k)}  # fmt: skip

    def aggregate(self, r, ups):
        if r < self.cfg.warmup_rounds:
            if self.cfg.warmup_aggregate and ups:
                ids = sorted(ups)
                self.warm_global = self.combine([ups[i] for i in ids],
                                                [self.weights[i] for i in ids])  # fmt: skip
            return
        self.experts, self.routers = aggregate_clusters(
            self.experts, self.routers, ups, self.alloc.assignment, self.weights, self.combine
        )

    def group_of(self, cid, r, upload):
        if r < self.cfg.warmup_rounds or self.alloc is None:
            return 0
        return self.alloc.assignment[cid]

    # -- results and checkpoints ---------------------------------------------------------------
    @property
    def num_experts(self):
        return self.alloc.num_experts if self.alloc else 1

    def assignment(self):
        return list(self.alloc.assignment) if self.alloc else [0] * self.n

    @property
    def allocation(self):
        return self.alloc

    def public(self):
        if self.alloc is None:
            return {}
        return {"num_experts": self.alloc.num_experts, "assignment": self.alloc.assignment}

    def set_public(self, public):
        if public:  # the client needs K and the assignment, not the distances
            self.alloc = Allocation(public["num_experts"], list(public["assignment"]), {},
                                    np.zeros((0, 0)))  # fmt: skip

    def state(self):
        if self.alloc is None:
            return {"warm_global": self.warm_global}, {"allocation": None}
        groups = {"experts": self.experts}
        groups |= {f"router{k}": rt for k, rt in enumerate(self.routers)}
        # the N x N distances as a tensor: as JSON they cost seconds per checkpoint at 1,000 clients
        groups["allocation"] = {"distances": torch.from_numpy(
            np.asarray(self.alloc.distance_matrix, dtype=np.float64))}  # fmt: skip
        return groups, {"allocation": allocation_to_json(self.alloc)}

    def restore(self, groups, meta):
        if meta.get("allocation") is None:
            self.warm_global = restored(self.warm_global, groups, "warm_global")
            return
        self.alloc = self._restored_allocation(groups, meta["allocation"])
        template = self.template(self.layout(self.cfg.warmup_rounds))
        self.experts = restored(select(template, is_expert), groups, "experts")
        router = select(template, is_router)
        self.routers = [restored(router, groups, f"router{k}") for k in range(self.num_experts)]

    def _restored_allocation(self, groups, saved) -> Allocation:
        """The checkpoint's allocation, refused unless it can be this run's: K experts in 1..N,
        every client assigned one of them, each used, N x N finite distances."""
        # older checkpoints kept the distances in the JSON
        distances = groups["allocation"]["distances"].numpy() if "allocation" in groups else None
        try:
            alloc = allocation_from_json(saved, distances)
            k = alloc.num_experts
            ok = isinstance(k, int) and 1 <= k <= self.n
            matrix = np.asarray(alloc.distance_matrix, dtype=np.float64)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint allocation is malformed ({exc!r})") from exc
        if not ok:
            raise CheckpointError(
                f"checkpoint allocation: num_experts = {k!r} is not in 1..{self.n}"
            )
        checked_choices(alloc.assignment, self.n, k, "allocation assignment", every=True)
        if matrix.shape != (self.n, self.n) or not np.isfinite(matrix).all():
            raise CheckpointError(f"checkpoint allocation: distances of shape {matrix.shape} are "
                                  f"not {self.n} x {self.n} finite numbers")  # fmt: skip
        return alloc


class FedLEASETopK(FedLEASE):
    name = "fedlease_topk"
    routing = "topk"


class FedLEASEFixedK(FedLEASE):
    name = "fedlease_fixed_k"
    fixed_k = True


class FedLEASERandom(FedLEASE):
    name = "fedlease_random"
    random_assignment = True


def aggregate_clusters(
    experts: State,
    routers: list[State],
    ups: dict[int, State],
    assignment: list[int],
    weights: list[float],
    combine: Aggregation | None = None,
) -> tuple[State, list[State]]:
    """Expert k and cluster k's router := ``combine`` (default: the sample-weighted mean) of the
    accepted uploads of cluster k's members (``ups``: client id -> upload); a cluster with none
    keeps its previous ones."""
    combine = combine or weighted_mean
    new_experts = {key: t.clone() for key, t in experts.items()}
    new_routers = []
    for k, previous in enumerate(routers):
        members = [i for i, a in enumerate(assignment) if a == k and i in ups]
        if not members:
            new_routers.append(previous)
            continue
        mean = combine([ups[i] for i in members], [weights[i] for i in members])
        for key in experts:
            new_experts[key][k] = mean[key]
        new_routers.append({key: mean[key] for key in previous})
    return new_experts, new_routers


def allocation_to_json(alloc: Allocation) -> dict:
    """The allocation without its N x N distances (a checkpoint stores them as a tensor)."""
    return {
        "num_experts": alloc.num_experts,
        "assignment": alloc.assignment,
        "silhouette": {str(k): v for k, v in alloc.silhouette.items()},
    }


def allocation_from_json(d: dict, distances: np.ndarray | None = None) -> Allocation:
    """Inverse of ``allocation_to_json``; ``distances`` default to a ``distance_matrix`` entry."""
    return Allocation(
        d["num_experts"],
        d["assignment"],
        {int(k): v for k, v in d["silhouette"].items()},
        np.asarray(d["distance_matrix"] if distances is None else distances),
    )


__all__ = ["FedLEASE", "FedLEASEFixedK", "FedLEASERandom", "FedLEASETopK", "aggregate_clusters"]
