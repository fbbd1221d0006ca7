"""What a client process holds: the frozen model on its device and precision, one client model per
layout, and the code of one client round. Shared by the in-process simulator and Flower nodes."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .. import models
from ..adapter_io import adapter_state_dict
from ..data import TASKS
from ..dropout import use_fast_dropout
from ..generation.score import Decoding
from ..inject import MoELoRAConfig, inject_moe_lora
from ..precision import attention_for, cast_frozen
from .client import ClientRunner, seed_for
from .config import FLConfig, Runtime
from .faults import AttackPlan, ClientFailure, FaultPlan, non_finite, poison
from .strategies import Strategy
from .strategies.base import HEAD
from .types import Layout, Reply, State, clone_state


def load_base(cfg: FLConfig, rt: Runtime):
    """The frozen model and tokenizer (a causal LM for ``generation``), a classifier's task head
    drawn from ``cfg.seed`` (every process that loads it for the same run, simulator or Flower
    node, gets the same head), with the attention ``rt`` computes best in; sets ``threads``.
    On CPU and in float32; ``ModelPool`` moves each client model to ``rt``'s device and
    precision."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    attn = attention_for(rt.device, rt.precision)
    if cfg.task_type == "generation":
        return models.load_causal(cfg.model, attn=attn)
    num_labels = max(TASKS[t].num_labels for t in cfg.clients)
    return models.load(cfg.model, num_labels=num_labels, attn=attn)


class ModelPool:
    """One client model per layout on a shared frozen base (adapters are swapped per client), on
    the run's device; in bf16 the frozen weights are stored in bf16, the trainable ones float32."""

    def __init__(self, cfg: FLConfig, base, tokenizer, progress: bool, rt: Runtime) -> None:
        self.cfg, self.base, self.tokenizer, self.progress = cfg, base, tokenizer, progress
        self.device, self.precision = rt
        self.runners: dict[Layout, ClientRunner] = {}
        self.templates: dict[Layout, State] = {}

    def runner(self, layout: Layout) -> ClientRunner:
        if layout not in self.runners:
            cfg = self.cfg
            mcfg = MoELoRAConfig(
                num_experts=layout.num_experts,
                rank=cfg.rank,
                alpha=cfg.alpha,
                dropout=cfg.dropout,
                routing=layout.routing,
                top_k=layout.top_k,
                target_modules=list(cfg.target_modules),
                trainable_modules=list(HEAD) if cfg.task_type == "classification" else [],
            )
            torch.manual_seed(cfg.seed)  # same seed, same initial adapters in every method
            model = inject_moe_lora(copy.deepcopy(self.base), mcfg, backend=cfg.backend)
            model.to(self.device)
            use_fast_dropout(model, cfg.fast_dropout)
            if self.precision == "bf16":
                cast_frozen(model, torch.bfloat16)
            decoding = (Decoding(self.tokenizer, cfg.max_new_tokens)
                        if cfg.task_type == "generation" else None)  # fmt: skip
            pad_id = self.tokenizer.pad_token_id
            self.runners[layout] = ClientRunner(model, pad_id, cfg, self.precision, self.progress,
                                                decoding)  # fmt: skip
            self.templates[layout] = clone_state(adapter_state_dict(model))
        return self.runners[layout]

    def template(self, layout: Layout) -> State:
        self.runner(layout)
        return self.templates[layout]


@dataclass
class ClientSide:
    """The client half of a run: its config, the method, the models, the injected faults."""

    cfg: FLConfig
    strategy: Strategy
    pool: ModelPool
    plan: FaultPlan

    def __post_init__(self) -> None:
        self.attacks = AttackPlan.from_config(self.cfg.attacks)

    def update(
        self, c, kept: State, received: State, r: int, desc: str = ""
    ) -> tuple[State | None, Reply]:
        """Client ``c``'s round ``r``: ``(new_state, reply)``. The state is None when the client
        crashed (an injected ``ClientFailure``: it sends nothing, the round goes on). A new state
        holding NaN/Inf comes back with status ``rejected``: the client must not keep it, the
        server must not average its upload."""
        cfg, strategy = self.cfg, self.strategy
        layout = strategy.layout(r)
        runner = self.pool.runner(layout)

        def loss_of(state: State, limit: int) -> float:
            return runner.train_loss(c, state, limit)

        template = self.pool.template(layout)
        state = strategy.client_state(c.client_id, template, kept, received, loss_of)
        steps = cfg.local_epochs * -(-len(c.train) // cfg.batch_size)
        try:
            new, loss = runner.train(
                c, state, seed_for(cfg.seed, r, c.client_id), strategy.own_expert(c.client_id, r),
                desc=desc, fail_at_step=self.plan.fail_at_step(r, c.client_id, steps),
                frozen=lambda key: strategy.frozen(key, r), training=strategy.training(r),
            )  # fmt: skip
        except ClientFailure as exc:
            return None, Reply.failed(str(exc))
        if self.plan.poisons(r, c.client_id):
            new = poison(new)
        status = {"status": "ok"}
        bad = non_finite(new)
        if bad:
            status.update(status="rejected", non_finite=bad[:3])
        if self.attacks.hits(r, c.client_id):  # the upload lies; the client keeps its own state
            tampered = self.attacks.tamper(state, new, r, c.client_id)
            upload = self.attacks.malform(strategy.up(c.client_id, r, tampered))
        else:
            upload = strategy.up(c.client_id, r, new)
        return new, Reply(upload, loss, status)
