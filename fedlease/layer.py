"""``MoELoRALinear``: a frozen ``nn.Linear`` plus a routed mixture of LoRA experts."""

from __future__ import annotations

import math

import torch
from torch import nn

from .ops import moe_lora_linear
from .routing import RoutingSpec, route


class MoELoRALinear(nn.Module):
    """``y = base(x) + (alpha / rank) * sum_e g_e(x) * B_e A_e dropout(x)``.

    Parameters are stacked in the layout the kernels read: ``lora_A (M, r, in)``,
    ``lora_B (M, out, r)``, ``router (S, in)`` with ``S = 2M - 1`` for ``routing="adaptive"``
    and ``S = M`` for ``"topk"`` and ``"dense"`` (see :mod:`fedlease.routing`). The router sees
    ``x``; the experts see ``dropout(x)``. ``B`` starts at zero, so a fresh layer equals its base.
    ``fast_dropout``: the ``cpp`` backend draws the dropout mask inside its op from a
    counter-based generator (``False``: aten's dropout, materialised, as before).
    """

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int,
        rank: int,
        alpha: float = 16,
        dropout: float = 0.0,
        routing: str = "adaptive",
        top_k: int | None = None,
        own_expert: int = 0,
        backend: str = "auto",
        fast_dropout: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.spec = RoutingSpec.make(routing, num_experts, top_k, own_expert)
        self._own_expert = own_expert
        self.base = base
        base.requires_grad_(False)
        self.routing, self.top_k = routing, top_k
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.backend = backend
        # the cpp backend draws the dropout mask inside its op; False: aten's dropout
        self.fast_dropout = fast_dropout
        w = base.weight
        kw = {"device": w.device, "dtype": w.dtype}
        m = num_experts
        self.lora_A = nn.Parameter(torch.empty(m, rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(m, base.out_features, rank, **kw))
        self.router = nn.Parameter(torch.empty(self.spec.num_slots, base.in_features, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A and router Kaiming-uniform (as PEFT initialises LoRA A), B zeros."""
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    @property
    def own_expert(self) -> int:
        """The client's own expert: adaptive routing folds slots M..2M-2 onto it."""
        return self._own_expert

    @own_expert.setter
    def own_expert(self, value: int) -> None:
        self.spec = RoutingSpec.make(self.routing, self.num_experts, self.top_k, value)
        self._own_expert = value

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clients is not None:
            return self._forward_clients(x)
        return self._op(x, self.lora_A, self.lora_B, self.router, self.spec)

    def _op(self, x, lora_A, lora_B, router, spec, shares=None) -> torch.Tensor:
        """The layer op on ``x`` with these adapters, router and routing spec(s) (and clients'
        token ``shares``), this layer's base, scaling, dropout, backend and train/eval mode."""
        return moe_lora_linear(x, self.base.weight, self.base.bias, lora_A, lora_B, router, spec,
                               self.scaling, dropout=self.dropout, training=self.training,
                               backend=self.backend, fast_dropout=self.fast_dropout,
                               shares=shares)  # fmt: skip

    # -- several clients in one layer -------------------------------------------------------------
    clients: int | None = None  # client slots (None: one client, unstacked parameters)
    # tokens of each active slot when they are not equal shares (fedlease.packing sets them)
    token_shares: list[int] | None = None

    def stack_clients(self, n: int) -> None:
        """Hold ``n`` clients: ``lora_A``, ``lora_B`` and ``router`` get a leading client dimension
        (each slot a copy of the current tensors) and every slot its own expert. ``forward`` then
        takes the tokens of the ``active`` slots, slot after slot in equal shares (x's leading
        dimension is ``len(active)`` times each client's). The frozen base stays one."""
        if self.clients is not None:
            raise ValueError(f"the layer already holds {self.clients} clients")
        for name in ("lora_A", "lora_B", "router"):
            p = getattr(self, name)
            setattr(self, name, nn.Parameter(p.detach()[None].repeat(n, *([1] * p.dim()))))
        self.clients = n
        self.own_experts = [self._own_expert] * n
        self.active = list(range(n))

    @property
    def own_experts(self) -> list[int]:
        """Each client slot's own expert."""
        return list(self._owns)

    @own_experts.setter
    def own_experts(self, owns: list[int]) -> None:
        self._owns = list(owns)
        self._specs = [RoutingSpec.make(self.routing, self.num_experts, self.top_k, own)
                       for own in owns]  # fmt: skip

    def _forward_clients(self, x: torch.Tensor) -> torch.Tensor:
        """The active slots' tokens, slot after slot: in equal shares, or in ``token_shares``."""
        active = self.active
        params = active_slots((self.lora_A, self.lora_B, self.router), active, self.clients)
        specs = [self._specs[i] for i in active]
        if self.token_shares is not None:
            y = self._op(x.reshape(-1, x.shape[-1]), *params, specs, self.token_shares)
        else:
            y = self._op(x.reshape(len(active), -1, x.shape[-1]), *params, specs)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """The dense ``(..., M)`` gate matrix after routing (float32), for inspection."""
        gates, _ = route(x @ self.router.t(), self.spec)
        return gates

    def extra_repr(self) -> str:
        return (
            f"in={self.base.in_features}, out={self.base.out_features}, "
            f"experts={self.num_experts}, rank={self.rank}, alpha={self.alpha:g}, "
            f"dropout={self.dropout:g}, "
            f"routing={self.routing!r}, slots={self.spec.num_slots}, own_expert={self.own_expert}"
        )


def active_slots(tensors, active: list[int], clients: int) -> tuple:
    """The ``active`` client slots of each client-stacked tensor (None stays None), in that
    order; the tensors themselves when every slot is active in order."""
    if active == list(range(clients)):
        return tuple(tensors)
    index = torch.tensor(active, device=next(t for t in tensors if t is not None).device)
    return tuple(None if t is None else t.index_select(0, index) for t in tensors)
