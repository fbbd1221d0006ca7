"""Federated runs in one process: one driver loop for every strategy, checkpoints, artefacts."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from ..adapter_io import load_adapter_state_dict, save_adapter
from ..data import build_client_data, source_for
from ..inject import set_own_expert
from . import checkpoint
from .allocation import Allocation
from .client import State, clone_state, payload_bytes
from .config import FLConfig, metric_of, runtime
from .faults import FaultPlan
from .participation import evaluated, participants
from .pool import ClientSide, ModelPool, load_base
from .robust import screen_round
from .strategies import Strategy, make_strategy
from .strategies.base import restored, select
from .strategies.fedlease import allocation_to_json


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

    def to_dict(self) -> dict:
        return asdict(self)


class Recorder:
    """Appends one JSON line per round to ``metrics.jsonl`` (flushed) and keeps them in memory.

    Starts from ``rows`` (a resumed run's completed rounds), rewriting the file to match them.
    """

    def __init__(self, out: Path | None, rows: list[dict] | None = None) -> None:
        self.rows: list[dict] = list(rows or [])
        self.path = out / "metrics.jsonl" if out else None
        if self.path:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def round_row(phase, r, clients, evals, losses, statuses, up, down, t0, participants=None,
              metric="accuracy") -> dict:  # fmt: skip
    """One line of metrics.jsonl. ``evals``: one dict per client, or None when the round was not
    evaluated (``eval_every``; its mean score is then NaN); ``participants``: the clients that
    trained (None: all); the others have status ``idle``. ``metric``: the per-client score whose
    mean the row reports as ``mean_<metric>`` (accuracy, or rouge1 for generation)."""
    per_client = []
    for i, (c, loss, st) in enumerate(zip(clients, losses, statuses)):
        e = evals[i] if evals is not None else {}
        per_client.append({"client": c.client_id, "task": c.task, "train_loss": loss, **st, **e})
    mean = float(np.nanmean([e[metric] for e in evals])) if evals is not None else float("nan")
    all_ids = [c.client_id for c in clients]
    return {
        "round": r,
        "phase": phase,
        "metric": metric,
        f"mean_{metric}": mean,
        "evaluated": evals is not None,
        "participants": list(participants) if participants is not None else all_ids,
        "clients": per_client,
        "failed": [c.client_id for c, st in zip(clients, statuses) if st["status"] == "failed"],
        "rejected": [c.client_id for c, st in zip(clients, statuses) if st["status"] == "rejected"],
        "bytes_up": up,
        "bytes_down": down,
        "wall_s": time.time() - t0,
    }


def check_survivors(statuses: list[dict], round_idx: int) -> None:
    if all(st["status"] != "ok" for st in statuses):
        raise RuntimeError(f"round {round_idx}: no client update survived ({statuses})")


ARTEFACTS = ("config.yaml", "metrics.jsonl", "clusters.json", "summary.json", "dendrogram.png",
             "distance_heatmap.png", "silhouette.png", "accuracy.png")  # fmt: skip


def clear_previous_run(out: Path) -> None:
    """A fresh run into a directory that holds an earlier one: remove that run's artefacts, its
    adapters and above all its checkpoint (a later --resume must not continue the old run).
    Nothing else in the directory is touched."""
    for name in ARTEFACTS:
        (out / name).unlink(missing_ok=True)
    for sub in (checkpoint.DIR, "adapters"):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)


class FederatedRun:
    """One federated run in this process. Its methods are the phases of every round, for every
    method: ``allocate`` (when the strategy collects the clients' tensors first, as FedLEASE does
    after its warm-up), ``train_round`` (a warm-up or adaptive round: each client trains as the
    strategy's layout and training spec for the round say, the server aggregates) and
    ``evaluate_round``; ``execute`` runs them with a checkpoint after every round.

    With an output directory ``resume=True`` continues from the last complete round found there
    and gives the same result as an uninterrupted run (every client's randomness is seeded by run
    seed, round and client id).
    """

    def __init__(
        self,
        cfg: FLConfig,
        output_dir: str | Path | None = None,
        progress: bool = True,
        resume: bool = False,
    ) -> None:
        self.cfg, self.progress = cfg, progress
        self.out = out = Path(output_dir) if output_dir is not None else None
        self.device, self.precision = runtime(cfg)  # a device this machine lacks stops here
        ckpt = checkpoint.load(out) if resume and out else None
        self.resumed = ckpt is not None
        self.t0 = time.time() - (ckpt.meta["elapsed_s"] if ckpt else 0.0)
        data_dir = source_for(cfg.task_type).resolve(cfg.data_dir)
        base, tokenizer = load_base(cfg)
        self.clients = build_client_data(cfg.clients, tokenizer, cfg.train_samples,
                                         cfg.test_samples, cfg.max_seq_len, cfg.seed,
                                         cfg.label_alpha, data_dir,
                                         task_type=cfg.task_type)  # fmt: skip
        if out:  # only now: bad data stops the run before anything is written
            if not resume:
                clear_previous_run(out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.rec = Recorder(out, ckpt.meta["metrics"] if ckpt else None)
        self.comm = dict(ckpt.meta["comm"]) if ckpt else {"up": 0, "down": 0}
        self.done = ckpt.meta["rounds_done"] if ckpt else 0
        self.pool = ModelPool(cfg, base, tokenizer, progress)
        self.strategy = make_strategy(cfg, [float(len(c.train)) for c in self.clients])
        self.strategy.setup(self.pool.template)
        self.side = ClientSide(cfg, self.strategy, self.pool, FaultPlan.from_config(cfg.faults))
        # clients whose kept state changed since the last checkpoint (all, before the first)
        self.dirty: set[int] = set() if ckpt else set(range(len(self.clients)))
        if ckpt:
            self._restore(ckpt)
        else:
            first = self.pool.template(self.strategy.layout(0))
            self.kept = [clone_state(first) for _ in self.clients]
            runner = self.pool.runner(self.strategy.layout(0))
            untrained = [runner.evaluate(c, first) for c in self.clients]
            self.initial_mean = float(np.mean([e[metric_of(cfg)] for e in untrained]))

    def _restore(self, ckpt) -> None:
        saved = checkpoint.unpack(ckpt.tensors)
        if "strategy" not in ckpt.meta:
            raise checkpoint.CheckpointError(
                f"checkpoint in {str(self.out)!r} has no strategy state"
            )
        self.strategy.restore_checkpoint(saved, ckpt.meta["strategy"])
        template = self.pool.template(self.strategy.layout(max(self.done - 1, 0)))
        self.kept = [restored(template, saved, f"client{c.client_id}") for c in self.clients]
        self.initial_mean = ckpt.meta["initial_mean"]

    def execute(self) -> Summary:
        """Every remaining round, then the summary and the artefacts."""
        if self.out and self.strategy.allocation is not None:  # resumed after the allocation
            write_clusters(self.out, self.strategy.allocation)
        total = self.strategy.total_rounds
        metric = metric_of(self.cfg)
        bar = tqdm(total=total, initial=self.done, desc="rounds", disable=not self.progress,
                   unit="round")  # fmt: skip
        for r in range(self.done, total):
            wanted = self.strategy.collect(r)
            up = self.allocate(r, wanted) if wanted is not None else 0
            ids = participants(self.cfg, r, self.strategy.samples(r))
            losses, statuses, round_up, down = self.train_round(r, ids)
            evals = self.evaluate_round(r) if evaluated(self.cfg, r, total) else None
            self.comm["up"] += up + round_up
            self.comm["down"] += down
            self.rec.add(round_row(self.strategy.phase(r), r, self.clients, evals, losses, statuses,
                                   up + round_up, down, self.t0, ids, metric))  # fmt: skip
            self.save_checkpoint(r + 1)
            bar.update()
            if evals is not None:
                bar.set_postfix({metric: f"{self.rec.rows[-1][f'mean_{metric}']:.3f}"})
        bar.close()
        return self.finish()

    def allocate(self, r: int, wanted) -> int:
        """Every client uploads the kept tensors the strategy asks for (FedLEASE: its warm-up
        adapter) and the strategy allocates from them; returns the bytes sent up."""
        uploads = [select(k, wanted) for k in self.kept]
        self.strategy.on_collect(r, uploads)
        if self.out and self.strategy.allocation is not None:
            write_clusters(self.out, self.strategy.allocation)
        return sum(payload_bytes(u) for u in uploads)

    def train_round(self, r: int, ids: list[int]) -> tuple[list, list[dict], int, int]:
        """The clients ``ids`` train from what they kept and what they received, the server
        aggregates their accepted uploads; the others sit the round out (status ``idle``) and
        keep their state. Returns ``(losses, statuses, bytes up, bytes down)`` per client."""
        losses: list = [None] * len(self.clients)
        statuses = [{"status": "idle"} for _ in self.clients]
        accepted = {}
        up = down = 0
        phase = self.strategy.phase(r)
        for cid in ids:
            c = self.clients[cid]
            received = self.strategy.down(cid, r)
            down += payload_bytes(received)
            desc = f"{phase} {r + 1} client {cid}"
            new, upload, loss, status = self.side.update(c, self.kept[cid], received, r, desc)
            losses[cid], statuses[cid] = loss, status
            if new is None:
                continue
            up += payload_bytes(upload)
            if status["status"] == "ok":
                accepted[cid] = upload
                self.kept[cid] = new
                self.dirty.add(cid)
        accepted = screen_round(self.strategy, r, accepted, statuses, self.cfg.max_norm_ratio)
        check_survivors([statuses[i] for i in ids], r)
        self.strategy.aggregate(r, accepted)
        return losses, statuses, up, down

    def evaluate_round(self, r: int) -> list[dict]:
        """Every client receives the aggregate, merges it into what it kept and is evaluated."""
        layout = self.strategy.layout(r)
        runner, template = self.pool.runner(layout), self.pool.template(layout)
        evals = []
        for c in self.clients:
            cid = c.client_id
            final = self.strategy.down(cid, r, final=True)
            self.kept[cid] = self.strategy.client_state(cid, template, self.kept[cid], final)
            self.dirty.add(cid)
            evals.append(runner.evaluate(c, self.kept[cid], self.strategy.own_expert(cid, r)))
        return evals

    def save_checkpoint(self, rounds_done: int) -> None:
        """The server state, and each client's kept state in its own file, rewritten only for
        the clients whose state changed since the last checkpoint."""
        if not self.out:
            return
        tensors, meta = self.strategy.checkpoint_state()
        clients = {f"client{i}": st for i, st in enumerate(self.kept)}
        unchanged = {f"client{i}" for i in range(len(self.kept)) if i not in self.dirty}
        checkpoint.save(self.out, rounds_done, {"comm": self.comm, "metrics": self.rec.rows,
                        "initial_mean": self.initial_mean, "elapsed_s": time.time() - self.t0,
                        "strategy": meta},
                        tensors, clients, unchanged)  # fmt: skip
        self.dirty = set()

    def finish(self) -> Summary:
        """The summary; with an output directory also the adapters, summary.json and plots."""
        cfg, clients, out = self.cfg, self.clients, self.out
        samples = {"train": [len(c.train) for c in clients], "test": [len(c.test) for c in clients]}
        summary = summarise(cfg, samples, self.strategy, self.rec.rows, self.comm,
                            time.time() - self.t0)  # fmt: skip
        summary.initial_mean = self.initial_mean
        summary.resumed_from_round = self.done if self.resumed else None
        summary.device, summary.precision = str(self.device), self.precision
        if out:
            if self.strategy.total_rounds:
                write_adapters(out / "adapters", cfg, self.pool, self.strategy, clients, self.kept)
            (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
            from .plots import write_plots

            write_plots(out, self.strategy.allocation, self.rec.rows, cfg.clients,
                        self.initial_mean)  # fmt: skip
        return summary


def run(
    cfg: FLConfig,
    output_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
) -> Summary:
    """Run ``cfg.method`` as configured; write artefacts to ``output_dir`` when given (see
    ``FederatedRun``)."""
    return FederatedRun(cfg, output_dir, progress, resume).execute()


def write_adapters(
    directory: Path, cfg: FLConfig, pool: ModelPool, strategy: Strategy, clients, kept: list[State]
) -> None:
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
        "mean": float(np.nanmean([c[metric] for c in last])) if last else float("nan"),
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
