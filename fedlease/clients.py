"""Several clients in one model: every MoE-LoRA layer and every trainable head holds one slot per
client (stacked along a new first dimension), the frozen model stays one. A batch then holds the
active clients' examples, client after client in equal shares, and each client's examples meet
only its own adapters, routers and head.

``stack_clients(model, n)`` converts an injected model; ``set_active(model, slots)`` says which
slots the next batches are for; ``load_slot`` / ``slot_state`` move one client's adapter state in
and out by the names a single-client model uses (``fedlease.adapter_state_dict``'s).
"""

from __future__ import annotations

import torch
from torch import nn

from .inject import _matches, moe_lora_layers
from .layer import active_slots


class ClientLinear(nn.Module):
    """``nn.Linear`` with one weight (and bias) per client slot: input rows in ``len(active)``
    equal shares, share i through slot ``active[i]``."""

    def __init__(self, linear: nn.Linear, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach()[None].repeat(n, 1, 1))
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach()[None].repeat(n, 1))
        self.clients, self.active = n, list(range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = active_slots((self.weight, self.bias), self.active, self.clients)
        rows = x.reshape(len(self.active), -1, x.shape[-1])
        if bias is None:
            y = torch.bmm(rows, weight.transpose(1, 2))
        else:  # autocast casts both as it casts a linear layer's
            y = torch.baddbmm(bias[:, None, :], rows, weight.transpose(1, 2))
        return y.reshape(*x.shape[:-1], weight.shape[1])


def stack_clients(model: nn.Module, n: int) -> nn.Module:
    """Give ``model`` (made by ``inject_moe_lora``) ``n`` client slots: its MoE-LoRA layers stack
    their adapters and routers, its ``trainable_modules`` that are linear layers become
    ``ClientLinear`` heads. In place; returns ``model``."""
    for layer in moe_lora_layers(model).values():
        layer.stack_clients(n)
    heads = model.moe_lora_config.trainable_modules
    for name, module in list(model.named_modules()):
        if name and _matches(name, heads):
            if not isinstance(module, nn.Linear):
                raise ValueError(f"trainable module {name!r} is a {type(module).__name__}: only "
                                 "linear heads can hold several clients")  # fmt: skip
            parent, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent) if parent else model, child, ClientLinear(module, n)
            )
    model.client_slots = n
    return model


def _slotted(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "clients", None) is not None]


def set_active(model: nn.Module, slots: list[int]) -> None:
    """The slots the next batches are for, in the order their examples come."""
    for module in _slotted(model):
        module.active = list(slots)


def set_own_experts(model: nn.Module, owns: list[int]) -> None:
    """Each slot's own expert, in every MoE-LoRA layer."""
    for layer in moe_lora_layers(model).values():
        layer.own_experts = owns


def load_slot(model: nn.Module, slot: int, state: dict[str, torch.Tensor]) -> None:
    """Copy one client's adapter state (single-client names and shapes) into ``slot``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name][slot].copy_(value)


def slot_state(model: nn.Module, slot: int, names) -> dict[str, torch.Tensor]:
    """The adapter state of ``slot``, by single-client names, as CPU copies."""
    params = dict(model.named_parameters())
    return {name: params[name][slot].detach().to("cpu", copy=True) for name in names}
