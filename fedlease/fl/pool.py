"""What a client process holds: the frozen model on its device and precision, one client model per
layout, and the code of one client round. Shared by the in-process simulator and Flower nodes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import models
from ..adapter_io import adapter_state_dict
from ..allocator import keep_freed_memory
from ..clients import stack_clients
from ..data import TASKS
from ..dropout import use_fast_dropout
from ..first_token import unsupported, use_first_token_output
from ..generation.score import Decoding
from ..inject import MoELoRAConfig, inject_moe_lora
from ..packing import packable, use_packing
from ..precision import attention_for, cast_frozen
from .batched import LockstepTrainer
from .client import ClientRunner, seed_for
from .config import FLConfig, Runtime
from .faults import AttackPlan, ClientFailure, FaultPlan, non_finite, poison
from .strategies import Strategy
from .strategies.base import HEAD
from .types import Layout, Reply, State, TrainSpec, clone_state


def load_base(cfg: FLConfig, rt: Runtime):
    """The frozen model and tokenizer (a causal LM for ``generation``), a classifier's task head
    drawn from ``cfg.seed`` (every process that loads it for the same run, simulator or Flower
    node, gets the same head), with the attention ``rt`` computes best in; sets ``threads``
    and keeps freed memory in the process (``fedlease.allocator``). On CPU and in float32;
    ``ModelPool`` moves each client model to ``rt``'s device and precision."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
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
        self.lockstep_trainers: dict[tuple[Layout, int], LockstepTrainer] = {}
        self.templates: dict[Layout, State] = {}
        # padding-free batches (``fedlease.packing``): the step's linear layers see real tokens only
        self.packs = (cfg.pack_sequences and self.device.type == "cpu"
                      and packable(base) is None)  # fmt: skip

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
            if self.packs:
                use_packing(model)
            if cfg.first_token_only and unsupported(model) is None:
                use_first_token_output(model)
            if self.precision == "bf16":
                cast_frozen(model, torch.bfloat16)
            decoding = (Decoding(self.tokenizer, cfg.max_new_tokens)
                        if cfg.task_type == "generation" else None)  # fmt: skip
            pad_id = self.tokenizer.pad_token_id
            self.runners[layout] = ClientRunner(model, pad_id, cfg, self.precision, self.progress,
                                                decoding)  # fmt: skip
            self.templates[layout] = clone_state(adapter_state_dict(model))
        return self.runners[layout]

    def lockstep(self, layout: Layout, slots: int) -> LockstepTrainer:
        """A trainer of up to ``slots`` clients at once for ``layout``: a copy of the layout's
        client model with a slot per client, sharing its frozen tensors (one frozen base)."""
        key = (layout, slots)
        if key not in self.lockstep_trainers:
            single = self.runner(layout).model
            shared = {id(t): t for t in (*single.parameters(), *single.buffers())
                      if not t.requires_grad}  # fmt: skip
            model = stack_clients(copy.deepcopy(single, memo=shared), slots)
            self.lockstep_trainers[key] = LockstepTrainer(
                model, self.tokenizer.pad_token_id, self.cfg, self.precision, self.progress,
                self.runner(layout).decoding,
            )  # fmt: skip
        return self.lockstep_trainers[key]

    def drop_lockstep(self, slots: int) -> None:
        """Forget the trainers of ``slots`` clients (their memory goes with them)."""
        for key in [k for k in self.lockstep_trainers if k[1] == slots]:
            del self.lockstep_trainers[key]

    def template(self, layout: Layout) -> State:
        self.runner(layout)
        return self.templates[layout]


@dataclass(frozen=True)
class LocalTask:
    """A client's training in one round: the model layout, the state it starts from, the seed
    of its data order (and dropout), its own expert, the step an injected crash stops it at, the
    tensors that never train and the optimizer settings (None: the run's AdamW)."""

    layout: Layout
    state: State
    seed: int
    own_expert: int | None
    fail_at_step: int | None
    frozen: Callable[[str], bool]
    training: TrainSpec | None


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
        task = self.start(c, kept, received, r)
        try:
            new, loss = self.pool.runner(task.layout).train(
                c, task.state, task.seed, task.own_expert, desc=desc,
                fail_at_step=task.fail_at_step, frozen=task.frozen, training=task.training,
            )  # fmt: skip
        except ClientFailure as exc:
            return None, Reply.failed(str(exc))
        return self.finish(c, task, new, loss, r)

    def start(self, c, kept: State, received: State, r: int,
              losses: list[float] | None = None) -> LocalTask:  # fmt: skip
        """What client ``c`` trains in round ``r``: its starting state (what it kept merged with
        what it received, as the strategy says) and how. ``losses``: those of the strategy's
        candidates, when computed already (a lockstep group's together); else one by one."""
        cfg, strategy, cid = self.cfg, self.strategy, c.client_id
        layout = strategy.layout(r)
        runner = self.pool.runner(layout)

        def losses_of(states: list[State], limit: int) -> list[float]:
            if losses is not None:
                return losses
            return [runner.train_loss(c, state, limit) for state in states]

        state = strategy.client_state(cid, self.pool.template(layout), kept, received, losses_of)
        steps = cfg.local_epochs * -(-len(c.train) // cfg.batch_size)
        return LocalTask(layout, state, seed_for(cfg.seed, r, cid), strategy.own_expert(cid, r),
                         self.plan.fail_at_step(r, cid, steps), lambda key: strategy.frozen(key, r),
                         strategy.training(r))  # fmt: skip

    def finish(self, c, task: LocalTask, new: State, loss: float, r: int) -> tuple[State, Reply]:
        """The client's reply once it trained: injected poison, its own check for NaN/Inf (a
        ``rejected`` status), and its upload (tampered when an attack hits it)."""
        cid, strategy = c.client_id, self.strategy
        if self.plan.poisons(r, cid):
            new = poison(new)
        status = {"status": "ok"}
        bad = non_finite(new)
        if bad:
            status.update(status="rejected", non_finite=bad[:3])
        if self.attacks.hits(r, cid):  # the upload lies; the client keeps its own state
            tampered = self.attacks.tamper(task.state, new, r, cid)
            upload = self.attacks.malform(strategy.up(cid, r, tampered))
        else:
            upload = strategy.up(cid, r, new)
        return new, Reply(upload, loss, status)
