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


# -- attacks: clients whose uploads are tampered with, for robustness tests and studies ----------
ATTACK_KEYS = {"clients": list, "kind": str, "factor": float, "from_round": int, "seed": int}
ATTACK_KINDS = ("scale", "sign_flip", "noise", "wrong_shape", "wrong_dtype")


@dataclass(frozen=True)
class AttackPlan:
    """``attacks: {clients: [3], kind: scale, factor: 100}``: from round ``from_round`` on, each
    listed client uploads a tampered update; it keeps its honest state itself. With the update
    ``u = new - start`` (what local training changed), the upload is built from
    ``start + factor * u`` (``scale``), ``start - factor * u`` (``sign_flip``) or
    ``start + u + factor * std(u) * N(0, 1)`` (``noise``, seeded per round and client); or the
    honest upload with its first tensor one row short (``wrong_shape``) or in float64
    (``wrong_dtype``)."""

    clients: tuple[int, ...] = ()
    kind: str = "scale"
    factor: float = 100.0
    from_round: int = 0
    seed: int = 0

    @staticmethod
    def from_config(attacks: dict | None) -> AttackPlan:
        raw = dict(attacks or {})
        if "clients" in raw:
            raw["clients"] = tuple(raw["clients"])
        if "factor" in raw:
            raw["factor"] = float(raw["factor"])
        return AttackPlan(**raw)

    def hits(self, round_idx: int, client: int) -> bool:
        return client in self.clients and round_idx >= self.from_round

    def tamper(self, start: dict, new: dict, round_idx: int, client: int) -> dict:
        """The state the tampered upload is cut from (``new`` itself for the malformed kinds)."""
        if self.kind not in ("scale", "sign_flip", "noise"):
            return new
        gen = torch.Generator().manual_seed(int(np.random.default_rng(
            [self.seed, 3, round_idx, client]).integers(2**31)))  # fmt: skip
        out = {}
        for k, v in new.items():
            s = start.get(k)
            if s is None or s.shape != v.shape or not v.is_floating_point():
                out[k] = v
                continue
            u = v - s.to(v.device, v.dtype)
            if self.kind == "scale":
                out[k] = s + self.factor * u
            elif self.kind == "sign_flip":
                out[k] = s - self.factor * u
            else:
                noise = torch.randn(v.shape, generator=gen).to(v.device, v.dtype)
                out[k] = v + self.factor * u.float().std().to(v.dtype) * noise
        return out

    def malform(self, upload: dict) -> dict:
        if self.kind == "wrong_shape" and upload:
            first = next(iter(upload))
            return {**upload, first: upload[first][:-1].clone()}
        if self.kind == "wrong_dtype":
            return {k: v.double() for k, v in upload.items()}
        return upload
