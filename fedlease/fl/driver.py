"""The round driver: one loop for every method and every way of reaching the clients.

``RoundDriver`` owns the run: the strategy, resuming from a checkpoint, and per round the
allocation upload (``collect``), the participants, the payloads down, the clients' replies, the
server's screening of uploads, one survivor rule, the aggregation, the evaluation, the metrics
row and the checkpoint; at the end the summary and the artefacts. A ``Transport`` says how
clients are reached: in this process (``fedlease.fl.inprocess``) or by Flower messages
(``fedlease.flower.server_app``). Both write the same checkpoint, metrics and summary.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import yaml
from tqdm.auto import tqdm

from . import checkpoint, results_json, rundir
from .allocation import Allocation
from .checkpoint_meta import check_meta
from .config import FLConfig, config_differences, metric_of
from .participation import evaluated, participants
from .robust import screen_round
from .strategies import Strategy, make_strategy
from .strategies.base import select
from .strategies.fedlease import allocation_to_json
from .types import ClientInfo, Layout, Reply, State, payload_bytes

log = logging.getLogger("fedlease")

# Keys a resumed run may change: they cannot change its results (threads: where the run computes;
# data_dir: where the same data lie). Every other key must be as the checkpoint recorded it.
RESUME_FREE = ("threads", "data_dir")


class Transport(Protocol):
    """How the driver reaches the clients. Calls come in this order: ``start``, ``bind``, then
    ``restore`` (resumed runs) or ``untrained``, then per round ``collect`` (when the strategy
    asks), ``train``, ``evaluate`` (evaluated rounds) and ``checkpoint``; ``finish`` last."""

    device: str  # where the clients train ("" when the driver cannot know)
    precision: str
    used_client_batch: int  # the most clients trained at once (1: one after another)

    def start(self) -> list[ClientInfo]:
        """Reach every client; their infos in client-id order."""

    def template(self, layout: Layout) -> State:
        """A fresh client model's adapter state (what the strategy sets up from)."""

    def bind(self, strategy: Strategy) -> None:
        """The run's strategy, set up: clients build their states from it."""

    def untrained(self) -> list[dict]:
        """Every client's evaluation of the fresh model."""

    def collect(self, r: int, wanted) -> list[State]:
        """Every client's kept tensors that ``wanted`` selects (all clients must answer)."""

    def train(self, r: int, payloads: dict[int, State]) -> dict[int, Reply]:
        """The clients of ``payloads`` train round ``r`` from what they kept and received; a
        client that cannot answer gets ``Reply.failed``."""

    def evaluate(self, r: int, finals: dict[int, State]) -> list[dict]:
        """Every client merges its final payload and is evaluated (NaN scores when one cannot
        answer)."""

    def checkpoint(self) -> tuple[dict[str, State], set[str], dict]:
        """What the checkpoint keeps for the clients: tensor groups, the names of those unchanged
        since the last checkpoint, JSON metadata."""

    def restore(self, ckpt: checkpoint.Checkpoint, groups: dict[str, State]) -> None:
        """Continue from a checkpoint (its unpacked tensor groups)."""

    def finish(self, out: Path | None) -> None:
        """After the last round (e.g. every client's adapter written to ``out``)."""


@dataclass
class Summary:
    method: str
    num_experts: int
    assignment: list[int]
    final: dict
    comm_bytes: dict
    wall_s: float
    rounds: int = 0
    clients: list[str] = field(default_factory=list)
    initial_mean: float = float("nan")  # mean score of the untrained model (random head)
    samples: dict = field(default_factory=dict)  # train/test examples per client
    resumed_from_round: int | None = None  # rounds already complete when this process resumed
    device: str = ""  # where the clients trained, e.g. "cpu" or "cuda:0"
    precision: str = ""  # "fp32" or "bf16"
    client_batch: int = 1  # the most clients trained (and evaluated) at once

    def to_dict(self) -> dict:
        return asdict(self)

    def mean_text(self) -> str:
        """The final mean score to 4 decimals, or why there is none."""
        mean = self.final["mean"]
        return "not evaluated (no rounds ran)" if mean is None else f"{mean:.4f}"


@dataclass
class RoundRow:
    """One line of ``metrics.jsonl``. ``evals``: one dict per client, or None when the round was
    not evaluated (``eval_every``; its mean score is then NaN). Clients outside ``participants``
    have status ``idle``. ``metric``: the per-client score whose mean the row reports as
    ``mean_<metric>`` (accuracy, or rouge1 for generation)."""

    round: int
    phase: str
    metric: str
    clients: list[ClientInfo]
    losses: list[float | None]
    statuses: list[dict]
    evals: list[dict] | None
    participants: list[int]
    bytes_up: int
    bytes_down: int
    wall_s: float

    def to_dict(self) -> dict:
        evals, metric = self.evals, self.metric
        per_client = []
        for i, (c, loss, st) in enumerate(zip(self.clients, self.losses, self.statuses)):
            e = evals[i] if evals is not None else {}
            per_client.append({"client": c.client_id, "task": c.task, "train_loss": loss, **st,
                               **e})  # fmt: skip
        mean = float(np.nanmean([e[metric] for e in evals])) if evals is not None else float("nan")
        return {
            "round": self.round,
            "phase": self.phase,
            "metric": metric,
            f"mean_{metric}": mean,
            "evaluated": evals is not None,
            "participants": list(self.participants),
            "clients": per_client,
            "failed": self._with("failed"),
            "rejected": self._with("rejected"),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "wall_s": self.wall_s,
        }

    def _with(self, status: str) -> list[int]:
        return [c.client_id for c, st in zip(self.clients, self.statuses) if st["status"] == status]


class Recorder:
    """Appends one JSON line per round to ``metrics.jsonl`` (flushed) and keeps them in memory.

    Starts from ``rows`` (a resumed run's completed rounds), rewriting the file to match them.
    """

    def __init__(self, out: Path | None, rows: list[dict] | None = None) -> None:
        self.rows: list[dict] = list(rows or [])
        self.path = out / "metrics.jsonl" if out else None
        if self.path:
            self.path.write_text("".join(results_json.dumps(r) + "\n" for r in self.rows))

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.path:
            with self.path.open("a") as f:
                f.write(results_json.dumps(row) + "\n")


class RoundDriver:
    """One federated run of ``cfg`` over ``transport``. With an output directory, ``resume=True``
    continues from the last complete round checkpointed there and ends as an uninterrupted run
    would. ``min_results``: the fewest participants that must answer a training round (a reply
    whose upload is rejected counts); every round also needs one usable update. A fresh run
    writes into a directory that is new or empty, or with ``overwrite`` one whose files in the
    run's places an earlier run wrote (``fedlease.fl.rundir``); it removes those and no other."""

    def __init__(self, cfg: FLConfig, transport: Transport, output_dir: str | Path | None = None,
                 resume: bool = False, progress: bool = True, min_results: int = 1,
                 overwrite: bool = False) -> None:  # fmt: skip
        self.cfg, self.transport, self.progress = cfg, transport, progress
        self.out = Path(output_dir) if output_dir is not None else None
        self.min_results = min_results
        self.metric = metric_of(cfg)
        ckpt = checkpoint.load(self.out) if resume and self.out else None
        if ckpt is not None:  # before anything is loaded or written
            self._check_resumable(ckpt.meta.get("config"))
            check_meta(ckpt.meta, str(self.out / checkpoint.DIR / checkpoint.META),
                       len(cfg.clients), cfg.warmup_rounds + cfg.rounds)  # fmt: skip
        elif self.out and (why := rundir.problem(self.out, overwrite)):
            raise rundir.OutputError(why)
        self.t0 = time.time() - (ckpt.meta["elapsed_s"] if ckpt else 0.0)
        self.clients = transport.start()
        if self.out:  # only now: bad data or clients stop the run before anything is written
            if ckpt is None:
                rundir.clear(self.out)
            rundir.make(self.out)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            rundir.record(self.out)
        self.strategy = make_strategy(cfg, [float(c.train) for c in self.clients])
        self.strategy.setup(transport.template)
        transport.bind(self.strategy)
        self.resumed_from = ckpt.meta["rounds_done"] if ckpt else None
        if ckpt:
            self._restore(ckpt)
        else:
            self.done, self.comm, self.rec = 0, {"up": 0, "down": 0}, Recorder(self.out)
            self.untrained = [e[self.metric] for e in transport.untrained()]

    def _restore(self, ckpt: checkpoint.Checkpoint) -> None:
        """The run as the checkpoint left it (its ``state.json`` checked by ``check_meta``)."""
        meta = ckpt.meta
        groups = checkpoint.unpack(ckpt.tensors)
        self.strategy.restore_checkpoint(groups, meta["strategy"])
        self.transport.restore(ckpt, groups)
        self.done, self.comm = meta["rounds_done"], dict(meta["comm"])
        self.rec = Recorder(self.out, meta["metrics"])
        # older in-process checkpoints kept only the mean
        self.untrained = meta.get("untrained") or [meta["initial_mean"]] * len(self.clients)

    def _check_resumable(self, recorded: dict | None) -> None:
        """A resumed run continues the run the checkpoint holds: a key that changes results
        (all but ``RESUME_FREE``) differing from the recorded config refuses the resume."""
        if recorded is None:  # a checkpoint from before configs were recorded in it
            return
        if not isinstance(recorded, dict):
            where = str(self.out)
            raise checkpoint.CheckpointError(f"checkpoint in {where!r}: its config is not an "
                                             "object; the run cannot be resumed")  # fmt: skip

        def bound(config: dict) -> dict:
            return {k: v for k, v in config.items() if k not in RESUME_FREE}

        differ = config_differences(bound(recorded), bound(self.cfg.to_dict()))
        if differ:
            raise checkpoint.CheckpointError(
                f"cannot resume {str(self.out)!r} with another config ({'; '.join(differ)}): the "
                "checkpoint's run would continue mixed with another; start a new run instead"
            )

    @property
    def initial_mean(self) -> float:
        return float(np.mean(self.untrained))

    def run(self) -> Summary:
        """Every remaining round, then the summary and the artefacts."""
        if self.out and self.strategy.allocation is not None:  # resumed after the allocation
            write_clusters(self.out, self.strategy.allocation)
        total = self.strategy.total_rounds
        bar = tqdm(total=total, initial=self.done, desc="rounds", disable=not self.progress,
                   unit="round")  # fmt: skip
        for r in range(self.done, total):
            row = self.round(r)
            self.rec.add(row)
            self.save_checkpoint(r + 1)
            bar.update()
            mean = row[f"mean_{self.metric}"]
            if row["evaluated"]:
                bar.set_postfix({self.metric: f"{mean:.3f}"})
            log.info("round %d/%d: mean %s %.4f", r + 1, total, self.metric, mean)
        bar.close()
        return self.finish()

    def round(self, r: int) -> dict:
        """Round ``r`` from the allocation upload to the evaluation: its metrics row."""
        strategy = self.strategy
        wanted = strategy.collect(r)
        up = self.allocate(r, wanted) if wanted is not None else 0
        ids = participants(self.cfg, r, strategy.samples(r))
        losses, statuses, round_up, down = self.train_round(r, ids)
        evals = self.evaluate_round(r) if evaluated(self.cfg, r, strategy.total_rounds) else None
        self.comm["up"] += up + round_up
        self.comm["down"] += down
        row = RoundRow(r, strategy.phase(r), self.metric, self.clients, losses, statuses, evals,
                       ids, up + round_up, down, time.time() - self.t0)  # fmt: skip
        return row.to_dict()

    def allocate(self, r: int, wanted) -> int:
        """Every client uploads the kept tensors the strategy asks for (FedLEASE: its warm-up
        adapter) and the strategy allocates from them; returns the bytes sent up."""
        uploads = self.transport.collect(r, wanted)
        self.strategy.on_collect(r, uploads)
        if self.out and self.strategy.allocation is not None:
            write_clusters(self.out, self.strategy.allocation)
        return sum(payload_bytes(u) for u in uploads)

    def train_round(self, r: int, ids: list[int]) -> tuple[list, list[dict], int, int]:
        """The clients ``ids`` train from what they kept and what they received, the server
        screens and aggregates their accepted uploads; the others sit the round out (status
        ``idle``). Returns ``(losses, statuses, bytes up, bytes down)`` per client."""
        n = len(self.clients)
        payloads = {i: self.strategy.down(i, r) for i in ids}
        down = sum(payload_bytes(p) for p in payloads.values())
        replies = self.transport.train(r, payloads)
        losses: list = [None] * n
        statuses = [{"status": "idle"} for _ in range(n)]
        accepted, up = {}, 0
        for i in ids:
            reply = replies[i]
            losses[i], statuses[i] = reply.loss, dict(reply.status)
            if reply.upload is None:
                warnings.warn(f"round {r}: client {i} failed: {reply.status.get('error')}",
                              stacklevel=2)  # fmt: skip
                continue
            up += payload_bytes(reply.upload)
            if reply.status["status"] == "ok":
                accepted[i] = reply.upload
            else:
                bad = reply.status.get("non_finite", [])
                warnings.warn(f"round {r}: rejected client {i}'s update: non-finite values in "
                              f"{bad}", stacklevel=2)  # fmt: skip
        accepted = screen_round(self.strategy, r, accepted, statuses, self.cfg.max_norm_ratio)
        self.check_survivors(r, [statuses[i] for i in ids])
        self.strategy.aggregate(r, accepted)
        return losses, statuses, up, down

    def check_survivors(self, r: int, statuses: list[dict]) -> None:
        """The round goes on when at least ``min_results`` participants answered (a rejected
        upload is the client's fault, not the round's) and one update is usable."""
        answered = sum(st["status"] in ("ok", "rejected") for st in statuses)
        ok = sum(st["status"] == "ok" for st in statuses)
        if answered < min(self.min_results, len(statuses)) or ok == 0:
            raise RuntimeError(f"round {r}: {answered} clients answered ({ok} usable updates), "
                               f"min-results = {self.min_results}: {statuses}")  # fmt: skip

    def evaluate_round(self, r: int) -> list[dict]:
        """Every client receives its final payload, merges it into what it kept and is
        evaluated."""
        finals = {c.client_id: self.strategy.down(c.client_id, r, final=True)
                  for c in self.clients}  # fmt: skip
        return self.transport.evaluate(r, finals)

    def save_checkpoint(self, rounds_done: int) -> None:
        """The server state, the clients' (what the transport keeps) and the run's metadata."""
        if not self.out:
            return
        tensors, strategy_meta = self.strategy.checkpoint_state()
        groups, unchanged, transport_meta = self.transport.checkpoint()
        meta = {"comm": self.comm, "metrics": self.rec.rows, "untrained": self.untrained,
                "elapsed_s": time.time() - self.t0, "strategy": strategy_meta,
                "config": self.cfg.to_dict(), **transport_meta}  # fmt: skip
        checkpoint.save(self.out, rounds_done, meta, tensors, groups, unchanged)
        rundir.record(self.out)

    def finish(self) -> Summary:
        """The summary; with an output directory also the transport's artefacts (adapters),
        summary.json and plots."""
        cfg, clients, out = self.cfg, self.clients, self.out
        samples = {"train": [c.train for c in clients], "test": [c.test for c in clients]}
        summary = summarise(cfg, samples, self.strategy, self.rec.rows, self.comm,
                            time.time() - self.t0)  # fmt: skip
        summary.initial_mean = self.initial_mean
        summary.resumed_from_round = self.resumed_from
        summary.device, summary.precision = self.transport.device, self.transport.precision
        summary.client_batch = self.transport.used_client_batch
        if out:
            if self.strategy.total_rounds:
                self.transport.finish(out)
            (out / "summary.json").write_text(
                results_json.dumps(summary.to_dict(), indent=2) + "\n"
            )
            from .plots import write_plots

            write_plots(out, self.strategy.allocation, self.rec.rows, cfg.clients,
                        self.initial_mean)  # fmt: skip
            rundir.record(out)
        return summary


def write_clusters(out: Path, alloc: Allocation) -> None:
    """``clusters.json``: the allocation as checkpoints record it, distances to 6 decimals."""
    record = allocation_to_json(alloc)
    record["distance_matrix"] = np.asarray(alloc.distance_matrix).round(6).tolist()  # readable
    (out / "clusters.json").write_text(json.dumps(record, indent=2) + "\n")


def summarise(
    cfg: FLConfig, samples: dict, strategy: Strategy, rows: list[dict], comm: dict, wall: float
) -> Summary:
    """The run's ``Summary`` from its metrics rows; ``samples``: train/test examples per client."""
    last = rows[-1]["clients"] if rows else []
    metric = metric_of(cfg)
    per_task: dict[str, list[float]] = {}
    for c in last:
        per_task.setdefault(c["task"], []).append(c[metric])
    final = {  # NaN: a client whose evaluation never arrived (Flower); the means skip it
        "metric": metric,
        "per_client": last,
        "per_task": {t: float(np.nanmean(v)) for t, v in per_task.items()},
        "mean": float(np.nanmean([c[metric] for c in last])) if last else None,  # no rounds ran
    }
    return Summary(
        cfg.method,
        strategy.num_experts,
        strategy.assignment(),
        final,
        dict(comm),
        wall,
        len(rows),
        list(cfg.clients),
        samples=samples,
    )


__all__ = ["RoundDriver", "RoundRow", "Summary", "Transport", "select"]
