"""Reaching the clients in this process: every client's data, and the state it keeps between
rounds, next to one frozen model per client layout (``ModelPool``); clients train one after
another or ``client_batch`` at a time in lockstep (``fedlease.fl.batched``). The ``Transport`` of
``fedlease run`` (see ``fedlease.fl.driver``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapter_io import load_adapter_state_dict, save_adapter
from ..data.sources import build_client_data, source_for
from ..inject import set_own_expert
from .checkpoint import Checkpoint
from .config import FLConfig, runtime
from .faults import FaultPlan
from .limits import check_model_fits, machine_bytes
from .pool import ClientSide, ModelPool, load_base
from .strategies import Strategy
from .strategies.base import restored, select
from .types import ClientInfo, Layout, Reply, State, clone_state

# Without padding-free batches clients train together only when their median sequence lengths
# are within this factor: padding SST-2's sentences (median 13 tokens) to QNLI's pairs (48) cost
# more than the larger step gained (benchmarks/RESULTS.md, bench_round.py). A packed step pads
# nothing but the attention, in buckets of rows of about the same length whoever's they are, so
# packed clients group whatever their lengths.
LENGTH_SPREAD = 1.5
# `client_batch: auto` on the CPU, by task type (bench_round.py, 16 GLUE clients at 128 tokens,
# bf16, AMX, RESULTS.md): with padding-free batches and the attention in length buckets, 16
# classification clients at once trained 1.59x faster than one by one, 8 at once 1.50x, 4 1.40x; 4
# SmolLM2 clients at once lost (0.87x training, 0.93x with logits at the answers only;
# 0.72-0.79x evaluation: a causal LM's logits over its vocabulary make a large step costly).
CPU_AUTO_CLIENTS = {"classification": 16, "generation": 1}
# Bytes a training step holds per token of its batch, hidden unit and layer (MiniLM in bf16,
# packed: 16 GLUE clients at once peaked 0.65 GB above groups of 4, whose largest step holds about
# 7,500 fewer tokens: 38 bytes), rounded up; `auto` on the CPU keeps a group's worst step (every
# sequence at max_seq_len) within half the machine's memory.
STEP_BYTES_PER_UNIT = 48
# Evaluation in lockstep keeps `eval_batch_size` examples a step in all, so it only merges
# clients' steps. On the CPU that gained nothing: in the same lockstep run (bench_round.py, 16 GLUE
# clients, 128 tokens, bf16, AMX) evaluating 4 clients at once took 2.14-2.22 s, one by one
# 2.13-2.21 s; 8 clients at 64 tokens with 100 test examples 1.28 against 1.21 s, with less peak
# memory one by one. So `auto` evaluates one by one there.
CPU_AUTO_EVAL_CLIENTS = 1


class InProcess:
    """Every client in this process. It keeps each client's state (``kept``) and checkpoints
    those whose state changed since the last checkpoint."""

    def __init__(self, cfg: FLConfig, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.rt = runtime(cfg)  # a device this machine lacks stops here
        self.device, self.precision = str(self.rt.device), self.rt.precision
        self.used_client_batch = 1
        self.fits: int | None = None  # with `auto`: most clients at once that fit the device
        self.step_units = 0  # the model's hidden units times layers (known once started)

    def start(self) -> list[ClientInfo]:
        cfg = self.cfg
        data_dir = source_for(cfg.task_type).resolve(cfg.data_dir)
        base, tokenizer = load_base(cfg, self.rt)
        check_model_fits(cfg, base, len(cfg.clients))
        self.step_units = getattr(base.config, "hidden_size", 0) * getattr(
            base.config, "num_hidden_layers", 0)  # fmt: skip
        self.data = build_client_data(cfg.clients, tokenizer, cfg.train_samples, cfg.test_samples,
                                      cfg.max_seq_len, cfg.seed, cfg.label_alpha, data_dir,
                                      task_type=cfg.task_type)  # fmt: skip
        self.pool = ModelPool(cfg, base, tokenizer, self.progress, self.rt)
        return [ClientInfo(c.client_id, c.task, len(c.train), len(c.test)) for c in self.data]

    def template(self, layout: Layout) -> State:
        return self.pool.template(layout)

    def bind(self, strategy: Strategy) -> None:
        self.strategy = strategy
        plan = FaultPlan.from_config(self.cfg.faults)
        self.side = ClientSide(self.cfg, strategy, self.pool, plan)
        first = self.pool.template(strategy.layout(0))
        self.kept = [clone_state(first) for _ in self.data]
        self.dirty = set(range(len(self.data)))  # changed since the last checkpoint

    def untrained(self) -> list[dict]:
        layout = self.strategy.layout(0)
        runner, first = self.pool.runner(layout), self.pool.template(layout)
        return [runner.evaluate(c, first) for c in self.data]

    def collect(self, r: int, wanted) -> list[State]:
        return [select(k, wanted) for k in self.kept]

    def train(self, r: int, payloads: dict[int, State]) -> dict[int, Reply]:
        """The clients train one after another, or ``client_batch`` at a time in lockstep; a
        client keeps its new state only when it is usable (status ``ok``)."""
        size = self.client_batch(len(payloads))
        phase, outcomes = self.strategy.phase(r), {}

        def work(group: list[int], size: int) -> dict:
            who = f"client {group[0]}" if size == 1 else f"{len(group)} clients"
            desc = f"{phase} {r + 1} {who}"
            if size == 1:
                cid = group[0]
                return {cid: self.side.update(self.data[cid], self.kept[cid], payloads[cid], r,
                                              desc)}  # fmt: skip
            return self._train_together(r, group, payloads, size, desc)

        for group in self.groups(list(payloads), size):
            outcomes |= self._within_memory(work, group, size)
        replies = {}
        for cid in payloads:  # the participants' order
            new, replies[cid] = outcomes[cid]
            if replies[cid].status["status"] == "ok":
                self.kept[cid] = new
                self.dirty.add(cid)
        return replies

    def groups(self, ids: list[int], size: int) -> list[list[int]]:
        """The clients that train together: up to ``size``, in order of their sequences' median
        length; where batches are padded (no packing) only of similar lengths (a step pads every
        sequence to its longest: a group's median lengths within ``LENGTH_SPREAD``)."""
        if size == 1:
            return [[cid] for cid in ids]
        ids = sorted(ids, key=lambda cid: (self.data[cid].typical_length, cid))
        spread = float("inf") if self.pool.packs else LENGTH_SPREAD
        groups: list[list[int]] = []
        for cid in ids:
            length = max(self.data[cid].typical_length, 1)
            if (
                groups
                and len(groups[-1]) < size
                and length <= spread * max(self.data[groups[-1][0]].typical_length, 1)
            ):
                groups[-1].append(cid)
            else:
                groups.append([cid])
        return groups

    def client_batch(self, participants: int, evaluation: bool = False) -> int:
        """How many clients train (or are evaluated) at once: ``client_batch``, or for ``auto``
        every participant on a GPU (fewer once the device ran out of memory, ``_within_memory``)
        and on the CPU at most ``CPU_AUTO_CLIENTS`` of the task type in training and
        ``CPU_AUTO_EVAL_CLIENTS`` in evaluation (measured, bench_round.py)."""
        value = self.cfg.client_batch
        if value == "auto":
            cpu = CPU_AUTO_EVAL_CLIENTS if evaluation else CPU_AUTO_CLIENTS[self.cfg.task_type]
            value = participants if self.rt.device.type == "cuda" else min(cpu, self._cpu_fits())
            value = min(value, self.fits or value)
        return max(1, min(participants, value))

    def _cpu_fits(self) -> int:
        """How many clients' training steps fit half the machine's memory, each at its worst
        (``batch_size`` sequences of ``max_seq_len`` tokens, ``STEP_BYTES_PER_UNIT``); no limit
        where the kernel does not say or before the model is loaded. The machine's memory, not
        what is available at the time: a client's numbers depend on its group (the group's
        random streams, the rounding of its GEMMs), so the groups must not change with what else
        the machine runs."""
        have = machine_bytes()
        step = self.cfg.batch_size * self.cfg.max_seq_len * self.step_units * STEP_BYTES_PER_UNIT
        return max(1, have // 2 // step) if have and step else len(self.cfg.clients)

    def _within_memory(self, work, group: list[int], size: int) -> dict:
        """``work(group, size)``; with ``client_batch: auto``, a group that runs the device out of
        memory is dropped and trained (or evaluated) again in halves, and later groups are no
        larger: every client's result is a function of what it starts from, so a retried client
        gets what it would have got. Records the largest ``client_batch`` that ran
        (``used_client_batch``, in the summary)."""
        try:
            out = work(group, size)
        except torch.OutOfMemoryError:
            if self.cfg.client_batch != "auto" or size == 1:
                raise
            self.pool.drop_lockstep(size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.fits = size // 2
            out = {}
            for start in range(0, len(group), self.fits):
                out |= self._within_memory(work, group[start : start + self.fits], self.fits)
            return out
        self.used_client_batch = max(self.used_client_batch, size)
        return out

    def _train_together(self, r: int, group: list[int], payloads, size: int, desc: str) -> dict:
        """``(new_state, reply)`` per client of ``group``, trained in lockstep on the round's
        trainer of ``size`` slots."""
        side = self.side
        picks = self._candidate_losses(r, group, payloads, size)
        tasks = [side.start(self.data[c], self.kept[c], payloads[c], r, picks.get(c))
                 for c in group]  # fmt: skip
        trainer = self.pool.lockstep(tasks[0].layout, size)
        results = trainer.train([self.data[c] for c in group], tasks, desc)
        out = {}
        for cid, task, (new, loss, failed) in zip(group, tasks, results):
            if failed is not None:
                out[cid] = (None, Reply.failed(failed))
            else:
                out[cid] = side.finish(self.data[cid], task, new, loss, r)
        return out

    def _candidate_losses(self, r: int, group: list[int], payloads, size: int) -> dict:
        """The losses each client of ``group`` picks its starting state by (the strategy's
        ``candidates``, e.g. IFCA's copies), every client's k-th candidate in one lockstep pass;
        ``{}`` when the strategy offers no choice."""
        strategy, layout = self.strategy, self.strategy.layout(r)
        template = self.pool.template(layout)
        found = {c: strategy.candidates(c, template, self.kept[c], payloads[c]) for c in group}
        candidates = {c: states for c, states in found.items() if states}
        if not candidates:
            return {}
        trainer = self.pool.lockstep(layout, size)
        losses: dict[int, list[float]] = {c: [] for c in candidates}
        for k in range(max(len(states) for states in candidates.values())):
            ids = [c for c in candidates if k < len(candidates[c])]
            got = trainer.train_losses([self.data[c] for c in ids],
                                       [candidates[c][k] for c in ids],
                                       [strategy.own_expert(c, r) for c in ids],
                                       strategy.pick_examples)  # fmt: skip
            for c, loss in zip(ids, got):
                losses[c].append(loss)
        return losses

    def evaluate(self, r: int, finals: dict[int, State]) -> list[dict]:
        """Every client merges its final payload into what it kept and is evaluated: one by one,
        or ``client_batch`` at a time in one forward (and one greedy decoding) per step."""
        strategy, layout = self.strategy, self.strategy.layout(r)
        runner, template = self.pool.runner(layout), self.pool.template(layout)
        for c in self.data:
            cid = c.client_id
            self.kept[cid] = strategy.client_state(cid, template, self.kept[cid], finals[cid])
            self.dirty.add(cid)
        size = self.client_batch(len(self.data), evaluation=True)

        def work(group: list[int], size: int) -> dict:
            if size == 1:
                cid = group[0]
                return {cid: runner.evaluate(self.data[cid], self.kept[cid],
                                             strategy.own_expert(cid, r))}  # fmt: skip
            trainer = self.pool.lockstep(layout, size)
            score = trainer.evaluate_generation if trainer.generation else trainer.evaluate
            scores = score([self.data[c] for c in group], [self.kept[c] for c in group],
                           [strategy.own_expert(c, r) for c in group])  # fmt: skip
            return dict(zip(group, scores))

        evals = {}
        for group in self.groups([c.client_id for c in self.data], size):
            evals |= self._within_memory(work, group, size)
        return [evals[c.client_id] for c in self.data]

    def checkpoint(self) -> tuple[dict[str, State], set[str], dict]:
        """Each client's kept state in its own group; files of unchanged clients are kept."""
        groups = {f"client{i}": st for i, st in enumerate(self.kept)}
        unchanged = {f"client{i}" for i in range(len(self.kept)) if i not in self.dirty}
        self.dirty = set()
        return groups, unchanged, {}

    def restore(self, ckpt: Checkpoint, groups: dict[str, State]) -> None:
        done = ckpt.meta["rounds_done"]
        template = self.pool.template(self.strategy.layout(max(done - 1, 0)))
        self.kept = [restored(template, groups, f"client{c.client_id}") for c in self.data]
        self.dirty = set()

    def finish(self, out: Path | None) -> None:
        if out is not None:
            write_adapters(out / "adapters", self.cfg, self.pool, self.strategy, self.data,
                           self.kept)  # fmt: skip


def write_adapters(directory: Path, cfg: FLConfig, pool: ModelPool, strategy: Strategy, clients,
                   kept: list[State]) -> None:  # fmt: skip
    """Every client's final model as a loadable adapter: ``<directory>/client<i>/``
    (``adapter_model.safetensors`` + ``adapter_config.json`` naming base model and task);
    ``fedlease eval --adapter`` evaluates one."""
    last = strategy.total_rounds - 1
    runner = pool.runner(strategy.layout(last))
    for c in clients:
        own = strategy.own_expert(c.client_id, last)
        load_adapter_state_dict(runner.model, kept[c.client_id], f"client {c.client_id}")
        set_own_expert(runner.model, 0 if own is None else own)
        extra = {
            "model": cfg.model,
            "task_type": cfg.task_type,
            "task": c.task,
            "max_seq_len": cfg.max_seq_len,
            "method": cfg.method,
            "client": c.client_id,
        }
        if cfg.task_type == "generation":
            extra["max_new_tokens"] = cfg.max_new_tokens
        else:
            extra["num_labels"] = runner.model.config.num_labels
        save_adapter(runner.model, directory / f"client{c.client_id}", extra)
