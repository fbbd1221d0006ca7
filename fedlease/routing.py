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

import functools
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
        """(S, M) float32 one-hot matrix with ``F[s, fold[s]] = 1``: gates = q @ F. Built once
        per device (no host-to-device copy per call)."""
        device = torch.device(device or "cpu")
        if torch.compiler.is_compiling():  # traced into the graph as a constant: no cache
            return _fold_matrix(self.fold, self.num_experts, device)
        return _cached_fold_matrix(self.fold, self.num_experts, device)


def _fold_matrix(fold: tuple[int, ...], num_experts: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # an ordinary tensor, even if first asked for in inference
        f = torch.zeros(len(fold), num_experts)
        f[torch.arange(len(fold)), torch.tensor(fold)] = 1.0
        return f.to(device)


_cached_fold_matrix = functools.lru_cache(maxsize=256)(_fold_matrix)


# Up to this many slots (2M - 1 with M <= 8) the kept slots are found by pairwise comparisons,
# as the kernels do: a few elementwise ops on (..., S, S), where a sort over every token (a radix
# sort on GPUs) costs far more. Wider routers fall back to a stable sort.
COMPARE_MAX_SLOTS = 16


def kept_slots(logits: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` largest logits per row (ties go to the lower slot).

    Ranked on the logits, not the probabilities: softmax is monotonic, and equal logits stay
    exactly equal, which vectorised exp does not promise for probabilities."""
    s = logits.shape[-1]
    if s <= COMPARE_MAX_SLOTS:
        mine, other = logits.unsqueeze(-1), logits.unsqueeze(-2)  # [..., s, u]
        lower = torch.ones(s, s, dtype=torch.bool, device=logits.device).tril_(-1)  # u < s
        beaten_by = (other > mine) | ((other == mine) & lower)
        return beaten_by.sum(-1) < keep
    chosen = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, chosen, True)


def slot_probs(logits: torch.Tensor, keep: int) -> torch.Tensor:
    """Renormalised probabilities of the ``keep`` best slots, zero elsewhere (float32)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if keep >= logits.shape[-1]:
        return torch.softmax(logits, dim=-1)
    # A softmax restricted to the kept slots equals the renormalised kept probabilities.
    masked = logits.masked_fill(~kept_slots(logits, keep), float("-inf"))
    return torch.softmax(masked, dim=-1)


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
