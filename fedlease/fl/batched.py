"""Several clients of a round trained in lockstep: one forward and one backward per step over
the union of their batches, through one model whose MoE-LoRA layers and task head hold a slot per
client (``fedlease.clients``) around one frozen base.

Every client keeps what it has when it trains alone (``ClientRunner.train``): its own data order
(seeded by run seed, round and client), its own loss (its batch's mean, class-weighted when the
round says so), its own optimizer state (``SlotOptimizer``: AdamW or the warm-up's SGD, state per
slot), its other experts' rows held fixed, the tensors that never train, iterate averaging of B.
Its gradient is that of its own mean loss: the step's loss is the sum of the clients' and no
client's examples meet another's adapters. A client with fewer steps (a smaller data set) drops
out of later steps with its tensors and optimizer state untouched, as does one that an injected
crash stops. Within a step each client's batch is padded to the largest (repeating its last
example, which its loss leaves out) and every sequence to the longest.

What differs from training the clients one by one: rounding (other GEMM shapes), and the dropout
masks, which one draw covers for all the clients of a step (seeded by the first client's seed):
the same distribution, other masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..clients import load_slot, set_active, set_own_experts, slot_state
from ..data.tokenize import IGNORE_INDEX, ClientData, Encoded, collate
from ..generation.decode import greedy_generate_ids
from ..generation.loss import answer_losses
from ..generation.rouge import rouge_scores
from ..generation.score import Decoding
from ..inject import moe_lora_layers
from ..precision import autocast
from .client import batch_order, class_weights, classification_scores
from .types import State, TrainSpec


class SlotOptimizer:
    """``torch.optim.AdamW`` or ``SGD`` (as ``TrainSpec.make`` builds them) over client-stacked
    parameters, with one state per slot: ``step(slots)`` updates those slots only, with the
    formulas of torch's single-tensor implementations. Slots that train together have taken
    the same number of steps (lockstep), so one step count serves them all."""

    def __init__(self, params: list[nn.Parameter], spec: TrainSpec) -> None:
        self.params, self.spec, self.steps = params, spec, 0
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, slots: list[int]) -> None:
        self.steps += 1
        first = self.params[0]
        index = (None if slots == list(range(first.shape[0]))
                 else torch.tensor(slots, device=first.device))  # fmt: skip
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            for name in ("exp_avg", "exp_avg_sq") if self.spec.optimizer == "adamw" else ("buf",):
                state.setdefault(name, torch.zeros_like(p.data))
            value = _rows(p.data, index)
            moments = {k: _rows(v, index) for k, v in state.items()}
            self._update(value, _rows(p.grad, index), moments)
            if index is not None:
                p.data.index_copy_(0, index, value)
                for k, v in moments.items():
                    state[k].index_copy_(0, index, v)

    def _update(self, param, grad, m) -> None:
        spec = self.spec
        if spec.optimizer == "sgd":  # momentum 0.9, no dampening, no weight decay
            if self.steps == 1:
                m["buf"].copy_(grad)
            else:
                m["buf"].mul_(0.9).add_(grad)
            param.add_(m["buf"], alpha=-spec.lr)
            return
        beta1, beta2, eps = 0.9, 0.999, 1e-8  # torch's AdamW defaults
        param.mul_(1 - spec.lr * spec.weight_decay)
        m["exp_avg"].lerp_(grad, 1 - beta1)
        m["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = spec.lr / (1 - beta1**self.steps)
        denom = (m["exp_avg_sq"].sqrt() / (1 - beta2**self.steps) ** 0.5).add_(eps)
        param.addcdiv_(m["exp_avg"], denom, value=-step_size)


def _rows(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """The slots ``index`` of ``t`` (a copy), or ``t`` itself for all of them."""
    return t if index is None else t.index_select(0, index)


@dataclass
class Lane:
    """One client in the lockstep: its data, its slot, its steps' example indices."""

    data: ClientData
    slot: int
    batches: list[list[int]]
    fail_at_step: int | None
    weight: torch.Tensor | None  # class weights (class-balanced loss)
    losses: list[float] = field(default_factory=list)
    failed: str | None = None

    def active(self, step: int) -> bool:
        return self.failed is None and step < len(self.batches)


class LockstepTrainer:
    """Trains up to ``slots`` clients at once on ``model`` (``stack_clients``'d, for one
    layout); ``cfg``: the run's config (batch size, local epochs, lr, weight decay)."""

    def __init__(self, model: nn.Module, pad_id: int, cfg, precision: str, progress: bool,
                 decoding: Decoding | None = None) -> None:  # fmt: skip
        self.model, self.pad_id, self.cfg = model, pad_id, cfg
        self.precision, self.progress, self.decoding = precision, progress, decoding
        self.generation = decoding is not None
        self.device = next(model.parameters()).device
        self.default = TrainSpec("adamw", cfg.lr, cfg.weight_decay)

    def train(self, clients: list[ClientData], tasks: list, desc: str = "") -> list[tuple]:
        """``(new_state, mean_loss, None)`` per client, or ``(None, None, why)`` for one that an
        injected crash stopped; ``tasks``: each client's ``LocalTask`` (one layout and one
        ``TrainSpec`` for all)."""
        model, training = self.model, tasks[0].training or self.default
        lanes = [self._lane(c, t, i, training) for i, (c, t) in enumerate(zip(clients, tasks))]
        names = list(tasks[0].state)
        for lane, task in zip(lanes, tasks):
            load_slot(model, lane.slot, task.state)
        set_own_experts(model, [t.own_expert or 0 for t in tasks])
        model.train(training.dropout)
        torch.manual_seed(tasks[0].seed)
        params = [p for name, p in model.named_parameters()
                  if p.requires_grad and not tasks[0].frozen(name)]  # fmt: skip
        opt = SlotOptimizer(params, training)
        fixed = _OtherExperts(model, [t.own_expert for t in tasks])
        b_mean = _SlotBMean(model) if training.average_b else None
        total = sum(len(lane.batches) for lane in lanes)
        bar = tqdm(total=total, desc=desc, leave=False, disable=not self.progress, unit="step")
        for step in range(max(len(lane.batches) for lane in lanes)):
            active = [lane for lane in lanes if lane.active(step)]
            for lane in active:
                if lane.fail_at_step == step:
                    lane.failed = (f"injected crash of client {lane.data.client_id} at step "
                                   f"{step}")  # fmt: skip
            active = [lane for lane in active if lane.failed is None]
            if not active:
                continue
            self._step(active, step, opt, fixed, b_mean)
            bar.update(len(active))
        bar.close()
        if b_mean is not None:
            b_mean.store()
        set_active(model, list(range(model.client_slots)))
        return [(None, None, lane.failed) if lane.failed else
                (slot_state(model, lane.slot, names), float(np.mean(lane.losses)), None)
                for lane in lanes]  # fmt: skip

    def _lane(self, data: ClientData, task, slot: int, training: TrainSpec) -> Lane:
        """The client's batches in the order it would draw them alone (``ClientRunner.train``)."""
        batches = batch_order(task.seed, len(data.train), self.cfg.batch_size,
                              self.cfg.local_epochs)  # fmt: skip
        weight = None
        if training.class_balanced and not self.generation:
            weight = class_weights(data.train.labels, self.model.config.num_labels)
        return Lane(data, slot, batches, task.fail_at_step, weight)

    def _step(self, lanes: list[Lane], step: int, opt: SlotOptimizer, fixed, b_mean) -> None:
        slots = [lane.slot for lane in lanes]
        batch, valid = self._batch(lanes, step)
        set_active(self.model, slots)
        weights = [lane.weight for lane in lanes] if lanes[0].weight is not None else None
        losses = self._losses(batch, valid, weights)
        opt.zero_grad()
        losses.sum().backward()
        opt.step(slots)
        fixed.restore()
        if b_mean is not None:
            b_mean.add(slots)
        for lane, loss in zip(lanes, losses.tolist()):
            lane.losses.append(loss)

    def _batch(self, lanes: list[Lane], step: int) -> tuple[dict, torch.Tensor]:
        return self._rows([(lane.data.train, lane.batches[step]) for lane in lanes])

    def _rows(self, parts: list[tuple[Encoded, list[int]]]) -> tuple[dict, torch.Tensor]:
        """One batch of every part's examples, part after part, each padded to the largest part
        with copies of its last example (``valid`` False; for generation their labels ignored)."""
        width = max(len(idx) for _, idx in parts)
        features, labels, valid = {k: [] for k in parts[0][0].features}, [], []
        for data, idx in parts:
            rows = idx + [idx[-1]] * (width - len(idx))
            for k, v in data.features.items():
                features[k] += [v[i] for i in rows]
            for j, i in enumerate(rows):
                y = data.labels[i]
                keep = j < len(idx)
                labels.append(y if keep or not self.generation else [IGNORE_INDEX] * len(y))
                valid.append(keep)
        batch = collate(features, labels, self.pad_id)
        return ({k: v.to(self.device) for k, v in batch.items()},
                torch.tensor(valid, device=self.device).view(len(parts), width))  # fmt: skip

    @torch.no_grad()
    def train_losses(self, clients: list[ClientData], states: list[State],
                     owns: list[int | None], limit: int) -> list[float]:  # fmt: skip
        """Each state's mean loss on its client's first ``limit`` training examples in eval
        mode, as ``ClientRunner.train_loss`` gives it one by one: the same chunks of
        ``eval_batch_size`` examples, every client's chunk of a step in one forward."""
        size = self.cfg.eval_batch_size
        self._load_for_evaluation(states, owns)
        counts = [min(limit, len(c.train)) for c in clients]
        chunks = [[list(range(s, min(s + size, n))) for s in range(0, n, size)] for n in counts]
        totals = [0.0] * len(clients)
        for step, slots, batch, valid in self._steps([c.train for c in clients], chunks):
            losses = self._losses(batch, valid, None).tolist()
            for k, i in enumerate(slots):
                totals[i] += losses[k] * len(chunks[i][step])
        return [total / n for total, n in zip(totals, counts)]

    def _steps(self, encoded: list[Encoded], chunks: list[list[list[int]]]):
        """Step by step, the next chunk of every client that has one (client i: rows
        ``chunks[i][step]`` of ``encoded[i]``) as one batch, each client's slot active; yields
        ``(step, slots, batch, valid)``, then makes every slot active again."""
        model = self.model
        for step in range(max(len(ch) for ch in chunks)):
            slots = [i for i, ch in enumerate(chunks) if step < len(ch)]
            batch, valid = self._rows([(encoded[i], chunks[i][step]) for i in slots])
            set_active(model, slots)
            yield step, slots, batch, valid
        set_active(model, list(range(model.client_slots)))

    @torch.no_grad()
    def evaluate(self, clients: list[ClientData], states: list[State],
                 owns: list[int | None]) -> list[dict]:  # fmt: skip
        """Classification clients' held-out scores, as ``evaluate_encoded`` gives them one by
        one: each client's test set in batches by length, the clients' batches of a step in one
        forward of ``eval_batch_size`` examples in all (no larger than one client's alone: on a
        CPU a forward of every client's full batch measured slower than one by one)."""
        size = self._load_for_evaluation(states, owns)
        batches = []
        for c in clients:
            order = sorted(range(len(c.test)), key=lambda i: len(c.test.features["input_ids"][i]))
            batches.append([order[s : s + size] for s in range(0, len(order), size)])
        preds, labels, loss_sums = ([[] for _ in clients], [[] for _ in clients],
                                    [0.0] * len(clients))  # fmt: skip
        for _, slots, batch, valid in self._steps([c.test for c in clients], batches):
            y = batch.pop("labels")
            with autocast(self.device, self.precision):
                logits = self.model(**batch).logits.float()
            loss = F.cross_entropy(logits, y, reduction="none").view(valid.shape)
            for k, i in enumerate(slots):
                keep = valid[k]
                loss_sums[i] += loss[k][keep].sum().item()
                preds[i].append(logits.view(*valid.shape, -1)[k][keep].argmax(-1).cpu())
                labels[i].append(y.view(valid.shape)[k][keep].cpu())
        return [classification_scores(torch.cat(p), torch.cat(t), loss, c.task)
                for p, t, loss, c in zip(preds, labels, loss_sums, clients)]  # fmt: skip

    def _load_for_evaluation(self, states: list[State], owns: list[int | None]) -> int:
        """Each client's state in its slot, the model in eval mode; returns the examples per
        client in a step (``eval_batch_size`` in all, as one client alone evaluates)."""
        for slot, state in enumerate(states):
            load_slot(self.model, slot, state)
        set_own_experts(self.model, [own or 0 for own in owns])
        self.model.eval()
        return max(1, self.cfg.eval_batch_size // len(states))

    @torch.no_grad()
    def evaluate_generation(self, clients: list[ClientData], states: list[State],
                            owns: list[int | None]) -> list[dict]:  # fmt: skip
        """Generation clients' held-out scores, as ``evaluate_generation`` gives them one by one:
        ROUGE of the greedy answers (``generate_answers``) and the loss of the references."""
        answers, loss_sums, tokens = self.generate_answers(clients, states, owns)
        decode = self.decoding.tokenizer.decode
        return [{**rouge_scores([decode(r, skip_special_tokens=True).strip() for r in rows],
                                c.test.references), "eval_loss": s / max(n, 1)}
                for rows, c, s, n in zip(answers, clients, loss_sums, tokens)]  # fmt: skip

    @torch.no_grad()
    def generate_answers(self, clients: list[ClientData], states: list[State],
                         owns: list[int | None]) -> tuple[list, list, list]:  # fmt: skip
        """Per client: its greedy answers' token ids, the summed loss of its reference answers and
        their token count. Per step every client's next test examples go through one
        teacher-forced forward and one greedy decoding of all their prompts, each sequence through
        its own client's adapters (a row stays in its client's segment while decoding)."""
        size = self._load_for_evaluation(states, owns)
        chunks = [[list(range(s, min(s + size, len(c.test)))) for s in range(0, len(c.test), size)]
                  for c in clients]  # fmt: skip
        loss_sums, tokens = [0.0] * len(clients), [0] * len(clients)
        answers: list[list[list[int]]] = [[] for _ in clients]
        for step in range(max(len(ch) for ch in chunks)):
            slots = [i for i, ch in enumerate(chunks) if step < len(ch)]
            set_active(self.model, slots)
            parts = [(clients[i].test, chunks[i][step]) for i in slots]
            sums, counts = self._answer_losses(parts)
            width = max(len(idx) for _, idx in parts)
            prompts = [data.prompts[j] for data, idx in parts
                       for j in idx + [idx[-1]] * (width - len(idx))]  # fmt: skip
            with autocast(self.device, self.precision):
                ids = greedy_generate_ids(self.model, prompts, self.decoding.max_new_tokens,
                                          self.decoding.pad_id, self.decoding.eos_id,
                                          batch_size=len(prompts))  # fmt: skip
            for k, (i, (_, idx)) in enumerate(zip(slots, parts)):
                loss_sums[i] += sums[k]
                tokens[i] += counts[k]
                answers[i] += ids[k * width : k * width + len(idx)]
        set_active(self.model, list(range(self.model.client_slots)))
        return answers, loss_sums, tokens

    def _answer_losses(self, parts: list[tuple[Encoded, list[int]]]) -> tuple[list, list]:
        """Per part: the summed next-token cross-entropy of its reference answers and how many
        tokens that sums (padding rows count none)."""
        batch, _ = self._rows(parts)
        with autocast(self.device, self.precision):
            sums, counts = answer_losses(self.model, batch, len(parts))
        return sums.tolist(), counts.tolist()

    def _losses(self, batch: dict, valid, weights: list[torch.Tensor] | None) -> torch.Tensor:
        """Each part's loss on ``batch`` (the model runs here): the mean over its valid examples
        (class-weighted by its row of ``weights`` when given), for generation the mean over its
        answer tokens (logits at those only), as its model alone would compute it."""
        n, width = valid.shape
        with autocast(self.device, self.precision):
            if self.generation:
                sums, counts = answer_losses(self.model, batch, n)
                return sums / counts.clamp_min(1)
            labels = batch.pop("labels")
            logits = self.model(**batch).logits
        per_example = F.cross_entropy(logits.float(), labels, reduction="none").view(n, width)
        weight = valid.float()
        if weights is not None:
            table = torch.stack(weights).to(logits.device)
            weight = weight * table.gather(1, labels.view(n, width))
        return (per_example * weight).sum(1) / weight.sum(1)


class _OtherExperts:
    """Each slot's other experts' rows as they were when training began, put back after every
    step (AdamW's weight decay would move them), as ``ClientRunner.train`` does per client."""

    def __init__(self, model: nn.Module, owns: list[int | None]) -> None:
        self.saved = []
        if any(own is None for own in owns):
            return
        for layer in moe_lora_layers(model).values():
            if layer.num_experts == 1:
                continue
            mask = torch.ones(layer.clients, layer.num_experts, dtype=torch.bool)
            mask[torch.arange(len(owns)), torch.tensor(owns)] = False
            mask[len(owns) :] = False
            mask = mask.to(layer.lora_A.device)
            for p in (layer.lora_A, layer.lora_B):
                self.saved.append((p, mask, p.detach()[mask].clone()))

    @torch.no_grad()
    def restore(self) -> None:
        for p, mask, values in self.saved:
            p[mask] = values


class _SlotBMean:
    """Per slot, the running mean of every ``lora_B`` over the steps that slot took."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [layer.lora_B for layer in moe_lora_layers(model).values()]
        self.sums = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.counts = [0] * self.params[0].shape[0]

    @torch.no_grad()
    def add(self, slots: list[int]) -> None:
        for s, p in zip(self.sums, self.params, strict=True):
            s[slots] += p[slots].float()
        for i in slots:
            self.counts[i] += 1

    @torch.no_grad()
    def store(self) -> None:
        seen = [i for i, n in enumerate(self.counts) if n > 0]
        for s, p in zip(self.sums, self.params, strict=True):
            for i in seen:
                p[i].copy_(s[i] / self.counts[i])


__all__ = ["LockstepTrainer", "SlotOptimizer", "State"]
