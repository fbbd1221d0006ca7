"""The ``torch`` backend: the MoE-LoRA op as a few large GEMMs with a hand-written backward.

Shapes (tokens flattened): x (T, in), A_cat (M*r, in), B_cat (out, M*r), router (S, in).

Forward, without dropout: one GEMM ``x @ [router; A_cat]^T`` gives the router logits and every
expert's projection ``a`` while x is read once; routing in float32; ``h = a * gate`` per rank
column; one ``addmm`` adds ``scaling * h @ B_cat^T`` into the base output.

Backward: ``dH = scaling * dy @ B_cat``; ``dB_cat = scaling * dy^T @ h``; the gate gradient
``dg_e = sum_r dH * a``; the restricted-softmax backward gives ``dlogits``; then one GEMM each for
``d[router; A_cat] = [dlogits, g * dH]^T @ x`` and ``dx = [dlogits, g * dH] @ [router; A_cat]``.
With dropout, the router and the experts see different inputs and the concatenation is split.
"""

from __future__ import annotations

import torch

from ..routing import RoutingSpec, route, slot_probs_backward


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
        spec: RoutingSpec,
        scaling: float,
    ) -> torch.Tensor:
        s = spec.num_slots
        if x.dtype in (torch.float16, torch.bfloat16):
            # Router logits in float32: 16-bit logits round near-ties and flip the top-M choice.
            logits, a = (
                x.float() @ router.float().t(),
                (x if x_drop is None else x_drop) @ a_cat.t(),
            )
        elif x_drop is None:
            z = x @ torch.cat([router, a_cat]).t()
            logits, a = z[:, :s], z[:, s:]
        else:
            logits, a = x @ router.t(), x_drop @ a_cat.t()
        gates, q = route(logits, spec)
        rank = a_cat.shape[0] // spec.num_experts
        g_rep = gates.to(a.dtype).repeat_interleave(rank, dim=1)
        h = a * g_rep
        y = torch.addmm(base_out, h, b_cat.t(), alpha=scaling)
        ctx.save_for_backward(x, x_drop, a, q, g_rep, a_cat, b_cat, router)
        ctx.spec, ctx.scaling, ctx.rank = spec, scaling, rank
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, x_drop, a, q, g_rep, a_cat, b_cat, router = ctx.saved_tensors
        spec, scaling, rank = ctx.spec, ctx.scaling, ctx.rank
        dy = dy.contiguous()
        d_h = (dy @ b_cat).mul_(scaling)
        d_b = torch.mm(dy.t(), a * g_rep).mul_(scaling) if ctx.needs_input_grad[4] else None
        # Gate gradient per expert, then through fold, renormalisation and softmax (float32).
        d_gates = (d_h.to(q.dtype) * a.to(q.dtype)).view(-1, spec.num_experts, rank).sum(-1)
        d_q = d_gates @ spec.fold_matrix(d_gates.device).to(d_gates.dtype).t()
        d_logits = slot_probs_backward(q, d_q).to(x.dtype)
        d_a = d_h.mul_(g_rep)
        dx = dx_drop = d_a_cat = d_router = None
        if x_drop is None:
            dz = torch.cat([d_logits, d_a], dim=1)
            if ctx.needs_input_grad[3] or ctx.needs_input_grad[5]:
                dw = dz.t() @ x
                d_router, d_a_cat = dw[: spec.num_slots], dw[spec.num_slots :]
            if ctx.needs_input_grad[0]:
                dx = dz @ torch.cat([router, a_cat])
        else:
            if ctx.needs_input_grad[5]:
                d_router = d_logits.t() @ x
            if ctx.needs_input_grad[3]:
                d_a_cat = d_a.t() @ x_drop
            if ctx.needs_input_grad[0]:
                dx = d_logits @ router
            if ctx.needs_input_grad[1]:
                dx_drop = d_a @ a_cat
        d_base = dy if ctx.needs_input_grad[2] else None
        return dx, dx_drop, d_base, d_a_cat, d_b, d_router, None, None


def moe_lora_torch(
    x: torch.Tensor,
    x_drop: torch.Tensor | None,
    base_out: torch.Tensor,
    a_cat: torch.Tensor,
    b_cat: torch.Tensor,
    router: torch.Tensor,
    spec: RoutingSpec,
    scaling: float,
) -> torch.Tensor:
    return MoELoRATorchFunction.apply(x, x_drop, base_out, a_cat, b_cat, router, spec, scaling)
