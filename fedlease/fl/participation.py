"""Which clients train in a round: every client, or ``clients_per_round`` of them drawn from the
run seed and the round alone, so that a resumed run, the Flower server and the in-process
simulator all draw the same clients, whatever happened before."""

from __future__ import annotations

import numpy as np

from .config import FLConfig, clients_per_round

STREAM = 0x70A7  # keeps these draws apart from every other use of the run seed


def participants(cfg: FLConfig, r: int, sampled: bool = True) -> list[int]:
    """The ids of the clients that train in round ``r``, ascending; all of them when the round
    does not sample (``sampled=False``) or ``clients_per_round`` covers everyone."""
    n = len(cfg.clients)
    k = clients_per_round(cfg)
    if not sampled or k >= n:
        return list(range(n))
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, r, STREAM]))
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))


def evaluated(cfg: FLConfig, r: int, total_rounds: int) -> bool:
    """Whether every client is evaluated after round ``r``: every ``eval_every`` rounds and
    after the last."""
    return (r + 1) % cfg.eval_every == 0 or r == total_rounds - 1
