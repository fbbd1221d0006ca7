"""The types that client and server code share: what a client holds, how it trains, what the
server knows of it and what it answers. Neither side's runtime is imported here."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

State = dict[str, torch.Tensor]  # named tensors: a client's kept state, a payload, an upload
OPTIMIZERS = ("adamw", "sgd")  # what a client may train with (TrainSpec.optimizer)


def clone_state(state: State) -> State:
    """A copy of ``state`` on the CPU: clients keep, send and checkpoint CPU tensors, whatever
    device they train on."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def payload_bytes(payload: State) -> int:
    """Bytes of the tensors in a message, as they would be serialised."""
    return sum(t.numel() * t.element_size() for t in payload.values())


@dataclass(frozen=True)
class Layout:
    """The client model: ``num_experts`` stacked LoRA experts under ``routing``."""

    num_experts: int = 1
    routing: str = "dense"
    top_k: int | None = None


@dataclass(frozen=True)
class TrainSpec:
    """How a client trains in a round: the optimizer, ``adamw`` (decoupled weight decay) or
    ``sgd`` (momentum 0.9, no weight decay: the update stays proportional to the accumulated
    gradient); whether the loss weighs each class by the inverse of its frequency in the
    client's training data (so that the client's label mix does not steer the update); whether
    dropout (the model's and the adapters') is on; whether the round leaves each ``lora_B`` at its
    mean over the round's steps (iterate averaging) instead of its last value."""

    optimizer: str
    lr: float
    weight_decay: float = 0.0
    class_balanced: bool = False
    dropout: bool = True
    average_b: bool = False

    def make(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.optimizer!r} (known: {', '.join(OPTIMIZERS)})")


@dataclass(frozen=True)
class ClientInfo:
    """What the server knows of a client: its id, task and example counts."""

    client_id: int
    task: str
    train: int
    test: int


@dataclass
class Reply:
    """A client's answer to a training message. ``status``: ``{"status": "ok"}``; ``"failed"``
    with ``error`` (it crashed or did not answer: no upload, no loss); or ``"rejected"`` with
    ``non_finite`` (its new state holds NaN/Inf: it kept its old state and the server must not
    average its upload)."""

    upload: State | None
    loss: float | None
    status: dict = field(default_factory=lambda: {"status": "ok"})

    @staticmethod
    def failed(error: str) -> Reply:
        return Reply(None, None, {"status": "failed", "error": error})
