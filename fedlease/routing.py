"""Routing math shared by every backend: slot probabilities -> per-expert gates.

All three routing modes are one computation over ``S`` router slots:

1. ``p = softmax(logits)`` over the ``S`` slots, in float32;
2. keep the ``keep`` most probable slots, i.e. the largest logits (ties go to the lower slot);
3. renormalise the kept probabilities to sum to 1 (a softmax restricted to the kept slots);
4. fold slot ``s`` onto expert ``fold[s]`` and sum: ``g[e] = sum_{s: fold[s] = e} q[s]``.

===========  =========  ========  ====================================================
mode         slots S    keep      fold
===========  =========  ========  ====================================================
adaptive     2M - 1     M         ``s -> s`` for ``s < M``; ``s -> own_expert`` otherwise
topk         M          top_k     identity
dense        M          M         identity
===========  =========  ========  ====================================================

In adaptive mode the own expert owns M of the 2M-1 slots, so at least one of the M kept slots
folds onto it: the own expert is always chosen and between 1 and M distinct experts are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROUTING_MODES = ("adaptive", "topk", "dense")


@dataclass(frozen=True)
class RoutingSpec:
    """What a router computes: ``num_slots`` logits, ``keep`` of them, folded by ``fold``."""

    num_experts: int
    num_slots: int
    keep: int
    fold: tuple[int, ...]

    @staticmethod
    def make(
        routing: str, num_experts: int, top_k: int | None = None, own_expert: int = 0
    ) -> RoutingSpec:
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        m = num_experts
        if not isinstance(own_expert, int) or not 0 <= own_expert < m:
            raise ValueError(f"own_expert must be in [0, {m - 1}], got {own_expert!r}")
        if routing == "adaptive":
            fold = tuple(range(m)) + (own_expert,) * (m - 1)
            return RoutingSpec(m, 2 * m - 1, m, fold)
        if routing == "topk":
            if top_k is None or not isinstance(top_k, int) or not 1 <= top_k <= m:
                raise ValueError(f"top_k must be an integer in [1, {m}] for topk, got {top_k!r}")
            return RoutingSpec(m, m, top_k, tuple(range(m)))
        return RoutingSpec(m, m, m, tuple(range(m)))

    @property
    def fold_target(self) -> int:
        """The expert that slots ``M..S-1`` fold onto (the own expert; 0 when no slot folds)."""
        return self.fold[-1] if self.num_slots > self.num_experts else 0

    def fold_matrix(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(S, M) float32 one-hot matrix with ``F[s, fold[s]] = 1``: gates = q @ F."""
        f = torch.zeros(self.num_slots, self.num_experts, device=device)
        f[torch.arange(self.num_slots), torch.tensor(self.fold)] = 1.0
        return f


def slot_probs(logits: torch.Tensor, keep: int) -> torch.Tensor:
    """Renormalised probabilities of the ``keep`` best slots, zero elsewhere (float32)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    p = torch.softmax(logits, dim=-1)
    if keep >= p.shape[-1]:
        return p
    # Rank by the logits (softmax is monotonic, and equal logits stay exactly equal, which
    # vectorised exp does not promise for probabilities); a stable descending sort breaks ties
    # towards the lower slot index, like the kernels do.
    chosen = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :keep]
    mask = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, chosen, True)
    q = torch.where(mask, p, torch.zeros_like(p))
    return q / q.sum(dim=-1, keepdim=True)


def slot_probs_backward(q: torch.Tensor, dq: torch.Tensor) -> torch.Tensor:
    """Gradient of the logits given ``dq``: the backward of a softmax restricted to the kept slots.

    ``q`` is zero outside the kept slots, so those slots get zero gradient.
    """
    return q * (dq - (q * dq).sum(dim=-1, keepdim=True))


def route(logits: torch.Tensor, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(gates (..., M), q (..., S))`` for router ``logits (..., S)``.

    Both are float32 (float64 when the logits are float64, for gradcheck).
    """
    if logits.shape[-1] != spec.num_slots:
        raise ValueError(f"expected {spec.num_slots} router logits, got {logits.shape[-1]}")
    q = slot_probs(logits, spec.keep)
    gates = q @ spec.fold_matrix(q.device).to(q.dtype)
    return gates, q
