"""Fault injection for testing a run's resilience, and the server's check of client updates.

``faults: {client_failure_rate: 0.2, nan_update_rate: 0.1, seed: 0}`` in a config makes each
client, each round, raise during local training with probability ``client_failure_rate`` (the
round continues with the survivors) or send an update poisoned with NaN with probability
``nan_update_rate`` (the server rejects it). Draws depend only on (seed, round, client).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FAULT_KEYS = {"client_failure_rate": float, "nan_update_rate": float, "seed": int}


class ClientFailure(RuntimeError):
    """An injected client crash."""


@dataclass(frozen=True)
class FaultPlan:
    client_failure_rate: float = 0.0
    nan_update_rate: float = 0.0
    seed: int = 0

    @staticmethod
    def from_config(faults: dict | None) -> FaultPlan:
        return FaultPlan(**(faults or {}))

    def _draw(self, stream: int, round_idx: int, client: int) -> float:
        return float(np.random.default_rng([self.seed, stream, round_idx, client]).random())

    def fail_at_step(self, round_idx: int, client: int, steps: int) -> int | None:
        """The local step at which this client crashes this round, or None."""
        if self._draw(0, round_idx, client) >= self.client_failure_rate:
            return None
        return int(self._draw(2, round_idx, client) * max(steps, 1))

    def poisons(self, round_idx: int, client: int) -> bool:
        return self._draw(1, round_idx, client) < self.nan_update_rate


def poison(update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same update with a NaN in its first tensor."""
    out = {k: v.clone() for k, v in update.items()}
    first = next(iter(out))
    out[first].view(-1)[0] = float("nan")
    return out


def non_finite(update: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding NaN or Inf."""
    return [k for k, v in update.items() if not torch.isfinite(v).all()]
