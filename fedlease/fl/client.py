"""Client-side work on a shared frozen model: load a client's tensors, train, evaluate."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapter_io import adapter_state_dict, load_adapter_state_dict
from ..data.glue import task_spec
from ..data.tokenize import ClientData, Encoded
from ..generation.loss import answer_loss
from ..generation.score import Decoding, evaluate_generation
from ..inject import moe_lora_layers, set_own_expert
from ..precision import autocast
from .faults import ClientFailure
from .types import State, TrainSpec, clone_state


def seed_for(seed: int, round_idx: int, client_id: int) -> int:
    """One RNG seed per (run seed, round, client): results do not depend on client order."""
    return int(np.random.SeedSequence([seed, round_idx, client_id]).generate_state(1)[0])


def batch_order(seed: int, n: int, batch_size: int, epochs: int) -> list[list[int]]:
    """A client's training batches (indices of its ``n`` examples) over ``epochs`` local epochs,
    in order: a fresh permutation per epoch from a generator seeded with ``seed``. Clients
    trained one by one and in lockstep draw the same batches."""
    rng, batches = np.random.default_rng(seed), []
    for _ in range(epochs):
        order = rng.permutation(n).tolist()
        batches += [order[s : s + batch_size] for s in range(0, n, batch_size)]
    return batches


def class_weights(labels: list[int], num_labels: int) -> torch.Tensor:
    """``n / (C * n_c)`` for each of the ``C`` classes present (``n_c`` examples of class c), 1
    for absent ones: every present class weighs the same in a weighted mean loss."""
    counts = torch.bincount(torch.tensor(labels), minlength=num_labels).double()
    present = int((counts > 0).sum())
    w = torch.where(counts > 0, len(labels) / (present * counts.clamp_min(1)), 1.0)
    return w.float()


class ClientRunner:
    """Trains and evaluates any client on one model whose adapter tensors are swapped per client."""

    def __init__(self, model: nn.Module, pad_id: int, cfg, precision: str = "fp32",
                 progress: bool = True, decoding: Decoding | None = None) -> None:  # fmt: skip
        """``cfg``: the run's config (learning rate, weight decay, batch sizes, local epochs);
        ``decoding``: set for a causal LM, scored by ROUGE of its greedy answers."""
        self.model = model
        self.decoding = decoding
        self.device = next(model.parameters()).device
        self.precision = precision
        self.pad_id = pad_id
        self.training = TrainSpec("adamw", cfg.lr, cfg.weight_decay)
        self.batch_size, self.eval_batch_size = cfg.batch_size, cfg.eval_batch_size
        self.local_epochs = cfg.local_epochs
        self.progress = progress

    def _load(self, state: State, own_expert: int | None) -> None:
        load_adapter_state_dict(self.model, state, "client state")
        if own_expert is not None:
            set_own_expert(self.model, own_expert)

    def train(
        self,
        data: ClientData,
        state: State,
        seed: int,
        own_expert: int | None = None,
        desc: str = "",
        fail_at_step: int | None = None,
        frozen: Callable[[str], bool] | None = None,
        training: TrainSpec | None = None,
    ) -> tuple[State, float]:
        """Local epochs from ``state`` as ``training`` says (default: AdamW at the run's lr and
        weight decay, plain loss); returns the new state and the mean train loss.

        With ``own_expert`` set, only that expert (plus routers and heads) changes: the other
        experts' rows are restored after every step (AdamW's weight decay would move them).
        Adapter tensors whose name ``frozen`` accepts do not train at all.
        """
        self._load(state, own_expert)
        model = self.model
        training = training or self.training
        model.train(training.dropout)  # eval mode: every dropout off, nothing else changes
        torch.manual_seed(seed)
        params = [p for name, p in model.named_parameters()
                  if p.requires_grad and not (frozen and frozen(name))]  # fmt: skip
        opt = training.make(params)
        weight = None
        if training.class_balanced and self.decoding is None:  # classes exist in classification
            weight = class_weights(data.train.labels, model.config.num_labels).to(self.device)
        fixed_rows = _other_expert_rows(model, own_expert)
        b_mean = _BMean(model) if training.average_b else None
        batches = batch_order(seed, len(data.train), self.batch_size, self.local_epochs)
        losses = []
        bar = tqdm(total=len(batches), desc=desc, leave=False, disable=not self.progress,
                   unit="step")  # fmt: skip
        for step, idx in enumerate(batches):
            if step == fail_at_step:
                bar.close()
                raise ClientFailure(f"injected crash of client {data.client_id} at step {step}")
            losses.append(self._step(self._batch(data.train, idx), weight, opt, fixed_rows,
                                     b_mean))  # fmt: skip
            bar.update()
        bar.close()
        if b_mean is not None:
            b_mean.store()
        return clone_state(adapter_state_dict(model)), float(np.mean(losses))

    def _step(self, batch: dict, weight, opt, fixed_rows, b_mean) -> float:
        """One optimizer step on ``batch`` (class-weighted loss with ``weight``); the rows in
        ``fixed_rows`` are put back after it, ``b_mean`` sees the new B. Returns the loss."""
        with autocast(self.device, self.precision):
            loss = self._loss(batch, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _restore(fixed_rows)
        if b_mean is not None:
            b_mean.add()
        return loss.item()

    def _loss(self, batch: dict, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The model's loss on ``batch``: a causal LM's over its answers (logits at the answer
        tokens only), a classifier's class-weighted by ``weight`` when given."""
        if self.decoding is not None:
            return answer_loss(self.model, batch)
        if weight is None:
            return self.model(**batch).loss
        labels = batch.pop("labels")
        logits = self.model(**batch).logits.float()
        return nn.functional.cross_entropy(logits, labels, weight=weight)

    def _batch(self, data: Encoded, idx: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in data.batch(idx, self.pad_id).items()}

    @torch.no_grad()
    def train_loss(self, data: ClientData, state: State, limit: int) -> float:
        """Mean loss of ``state`` on the first ``limit`` training examples (eval mode)."""
        self._load(state, None)
        self.model.eval()
        n = min(limit, len(data.train))
        total = 0.0
        for start in range(0, n, self.eval_batch_size):
            idx = list(range(start, min(start + self.eval_batch_size, n)))
            with autocast(self.device, self.precision):
                total += self._loss(self._batch(data.train, idx)).item() * len(idx)
        return total / n

    @torch.no_grad()
    def evaluate(self, data: ClientData, state: State, own_expert: int | None = None) -> dict:
        self._load(state, own_expert)
        self.model.eval()
        with autocast(self.device, self.precision):
            if self.decoding is not None:
                return evaluate_generation(self.model, data.test, self.decoding,
                                           self.eval_batch_size)  # fmt: skip
            return evaluate_encoded(
                self.model, data.test, data.task, self.pad_id, self.eval_batch_size
            )


def _other_expert_rows(
    model: nn.Module, own: int | None
) -> list[tuple[torch.Tensor, list[int], torch.Tensor]]:
    """(parameter, rows of the other experts, their values) for every stacked adapter tensor."""
    if own is None:
        return []
    saved = []
    for layer in moe_lora_layers(model).values():
        if layer.num_experts == 1:
            continue
        keep = [e for e in range(layer.num_experts) if e != own]
        for p in (layer.lora_A, layer.lora_B):
            saved.append((p, keep, p.detach()[keep].clone()))
    return saved


class _BMean:
    """Running mean of every adapter ``lora_B`` over the steps it has seen; ``store()`` writes it
    into the parameters."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [layer.lora_B for layer in moe_lora_layers(model).values()]
        self.sums = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def add(self) -> None:
        for s, p in zip(self.sums, self.params, strict=True):
            s.add_(p.float())
        self.steps += 1

    @torch.no_grad()
    def store(self) -> None:
        if self.steps:
            for s, p in zip(self.sums, self.params, strict=True):
                p.copy_(s / self.steps)


def _restore(saved) -> None:
    with torch.no_grad():
        for p, rows, values in saved:
            p[rows] = values


def evaluate_encoded(
    model: nn.Module, data: Encoded, task: str, pad_id: int, batch_size: int
) -> dict:
    """Accuracy and mean loss on ``data`` (binary F1 of class 1 too for MRPC/QQP)."""
    device = next(model.parameters()).device
    order = sorted(range(len(data)), key=lambda i: len(data.features["input_ids"][i]))
    preds, labels, loss_sum = [], [], 0.0
    for start in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in data.batch(order[start : start + batch_size],
                                                        pad_id).items()}  # fmt: skip
        out = model(**batch)
        loss_sum += out.loss.item() * len(batch["labels"])
        preds.append(out.logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    return classification_scores(torch.cat(preds), torch.cat(labels), loss_sum, task)


def classification_scores(p: torch.Tensor, y: torch.Tensor, loss_sum: float, task: str) -> dict:
    """Accuracy of predictions ``p`` against labels ``y``, the mean loss, and for MRPC/QQP the
    binary F1 of class 1."""
    result = {"accuracy": (p == y).double().mean().item(), "eval_loss": loss_sum / len(y)}
    if task_spec(task).f1:
        tp = ((p == 1) & (y == 1)).sum().item()
        fp = ((p == 1) & (y == 0)).sum().item()
        fn = ((p == 0) & (y == 1)).sum().item()
        result["f1"] = 2 * tp / max(2 * tp + fp + fn, 1)
    return result
