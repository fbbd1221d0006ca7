"""The ``torch`` backend: the MoE-LoRA op as a few large batched GEMMs with a hand-written
backward, over a leading client dimension (one client is N = 1).

Shapes (tokens flattened per client): x (N, T, in), A_cat (N, M*r, in), B_cat (N, out, M*r),
router (N, S, in), fold (N, S, M): each client's slot -> expert one-hot matrix (clients differ in
their own expert).

Forward, without dropout: one batched GEMM ``x @ [router; A_cat]^T`` gives the router logits and
every expert's projection ``a`` while x is read once; routing in float32; ``h = a * gate`` per
rank column; one ``baddbmm`` adds ``scaling * h @ B_cat^T`` into the base output.

Backward: ``dH = scaling * dy @ B_cat``; ``dB_cat = scaling * dy^T @ h``; the gate gradient
``dg_e = sum_r dH * a``; the restricted-softmax backward gives ``dlogits``; then one batched GEMM
each for ``d[router; A_cat] = [dlogits, g * dH]^T @ x`` and ``dx = [dlogits, g * dH] @ [router;
A_cat]``. With dropout, the router and the experts see different inputs and the concatenation is
split.
"""

from __future__ import annotations

import torch

from ..routing import RoutingSpec, slot_probs, slot_probs_backward


def _t(m: torch.Tensor) -> torch.Tensor:
    return m.transpose(1, 2)


class MoELoRATorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        x_drop: torch.Tensor | None,
        base_out: torch.Tensor,
        a_cat: torch.Tensor,
        b_cat: torch.Tensor,
        router: torch.Tensor,
        fold: torch.Tensor,
        spec: RoutingSpec,
        scaling: float,
    ) -> torch.Tensor:
        s = spec.num_slots
        if x.dtype in (torch.float16, torch.bfloat16):
            # Router logits in float32: 16-bit logits round near-ties and flip the top-M choice.
            logits = torch.bmm(x.float(), _t(router.float()))
            a = torch.bmm(x if x_drop is None else x_drop, _t(a_cat))
        elif x_drop is None:
            z = torch.bmm(x, _t(torch.cat([router, a_cat], dim=1)))
            logits, a = z[..., :s], z[..., s:]
        else:
            logits, a = torch.bmm(x, _t(router)), torch.bmm(x_drop, _t(a_cat))
        q = slot_probs(logits, spec.keep)
        gates = torch.bmm(q, fold.to(q.dtype))
        rank = a_cat.shape[1] // spec.num_experts
        g_rep = gates.to(a.dtype).repeat_interleave(rank, dim=-1)
        h = a * g_rep
        y = torch.baddbmm(base_out, h, _t(b_cat), alpha=scaling)
        ctx.save_for_backward(x, x_drop, a, q, g_rep, a_cat, b_cat, router, fold)
        ctx.spec, ctx.scaling, ctx.rank = spec, scaling, rank
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, x_drop, a, q, g_rep, a_cat, b_cat, router, fold = ctx.saved_tensors
        spec, scaling, rank = ctx.spec, ctx.scaling, ctx.rank
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        d_h = torch.bmm(dy, b_cat).mul_(scaling)
        d_b = torch.bmm(_t(dy), a * g_rep).mul_(scaling) if need[4] else None
        # Gate gradient per expert, then through fold, renormalisation and softmax (float32).
        d_gates = (d_h.to(q.dtype) * a.to(q.dtype)).unflatten(-1, (spec.num_experts, rank)).sum(-1)
        d_q = torch.bmm(d_gates, _t(fold.to(d_gates.dtype)))
        d_logits = slot_probs_backward(q, d_q).to(x.dtype)
        d_a = d_h.mul_(g_rep)
        dx = dx_drop = d_a_cat = d_router = None
        if x_drop is None:
            dz = torch.cat([d_logits, d_a], dim=-1)
            if need[3] or need[5]:
                dw = torch.bmm(_t(dz), x)
                d_router, d_a_cat = dw[:, : spec.num_slots], dw[:, spec.num_slots :]
            if need[0]:
                dx = torch.bmm(dz, torch.cat([router, a_cat], dim=1))
        else:
            if need[5]:
                d_router = torch.bmm(_t(d_logits), x)
            if need[3]:
                d_a_cat = torch.bmm(_t(d_a), x_drop)
            if need[0]:
                dx = torch.bmm(d_logits, router)
            if need[1]:
                dx_drop = torch.bmm(d_a, a_cat)
        d_base = dy if need[2] else None
        return dx, dx_drop, d_base, d_a_cat, d_b, d_router, None, None, None


def moe_lora_torch(
    x: torch.Tensor,
    x_drop: torch.Tensor | None,
    base_out: torch.Tensor,
    a_cat: torch.Tensor,
    b_cat: torch.Tensor,
    router: torch.Tensor,
    fold: torch.Tensor,
    spec: RoutingSpec,
    scaling: float,
) -> torch.Tensor:
    """The op on client-stacked tensors (see the module docstring); ``spec`` gives the slots kept
    and the expert count, ``fold`` each client's slot -> expert matrix."""
    return MoELoRATorchFunction.apply(x, x_drop, base_out, a_cat, b_cat, router, fold, spec,
                                      scaling)  # fmt: skip
