"""Federated methods as strategy objects over one driver: FedLEASE, its ablations, baselines."""

from __future__ import annotations

from .base import Layout, State, Strategy, merge
from .feddpa import FedDPA
from .fedlease import FedLEASE, FedLEASEFixedK, FedLEASERandom, FedLEASETopK, aggregate_clusters
from .ifca import IFCA
from .lora import FedIT, FedSALoRA, FFALoRA, Local

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedLEASE,
        FedLEASETopK,
        FedLEASEFixedK,
        FedLEASERandom,
        Local,
        FedIT,
        FFALoRA,
        FedSALoRA,
        FedDPA,
        IFCA,
    )
}


def make_strategy(cfg, weights: list[float]) -> Strategy:
    """The strategy ``cfg.method`` names, for clients with these sample counts."""
    try:
        cls = STRATEGIES[cfg.method]
    except KeyError:
        raise ValueError(
            f"unknown method {cfg.method!r} (known: {', '.join(STRATEGIES)})"
        ) from None
    return cls(cfg, weights)


__all__ = ["STRATEGIES", "Layout", "State", "Strategy", "aggregate_clusters", "make_strategy",
           "merge"]  # fmt: skip
