"""The slow, obviously-correct MoE-LoRA forward, written straight from the equations.

One token at a time, one slot at a time, with ordinary autograd. Tests compare every fast path
with it; nothing else should call it.
"""

from __future__ import annotations

import torch

from .routing import RoutingSpec


def reference_slot_weights(
    logits: torch.Tensor, spec: RoutingSpec
) -> list[tuple[int, torch.Tensor]]:
    """``[(slot, weight), ...]`` for the kept slots of one token's router logits (S,)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    p = torch.softmax(logits, dim=0)
    ranked = sorted(range(spec.num_slots), key=lambda s: (-logits[s].item(), s))
    chosen = ranked[: spec.keep]
    total = sum(p[s] for s in chosen)
    return [(s, p[s] / total) for s in chosen]


def reference_gates(logits: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """Gates (M,) for one token's router logits (S,): kept slot weights summed per expert."""
    gates = [logits.new_zeros((), dtype=torch.float64) for _ in range(spec.num_experts)]
    for s, w in reference_slot_weights(logits, spec):
        gates[spec.fold[s]] = gates[spec.fold[s]] + w.double()
    return torch.stack(gates)


def reference_moe_lora(
    x: torch.Tensor,
    base_out: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    router: torch.Tensor,
    spec: RoutingSpec,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y_t = base_t + scaling * sum_e g_e(x_t) B_e A_e (x_t * mask_t)`` for each token t.

    ``dropout_mask`` (same shape as x) already holds the ``1 / (1 - p)`` scale of kept entries.
    """
    xs = x.reshape(-1, x.shape[-1])
    bs = base_out.reshape(-1, base_out.shape[-1])
    masks = None if dropout_mask is None else dropout_mask.reshape(xs.shape)
    rows = []
    for t in range(xs.shape[0]):
        xt = xs[t]
        x_expert = xt if masks is None else xt * masks[t]
        yt = bs[t]
        for s, weight in reference_slot_weights(router @ xt, spec):
            e = spec.fold[s]
            update = lora_B[e] @ (lora_A[e] @ x_expert)
            yt = yt + scaling * weight.to(update.dtype) * update
        rows.append(yt)
    return torch.stack(rows).reshape(base_out.shape)
