"""Federated runs in one process: one driver loop for every strategy, checkpoints, artefacts."""

from __future__ import annotations

import copy
import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from .. import models
from ..adapter_io import adapter_state_dict, load_adapter_state_dict, save_adapter
from ..data import TASKS, build_client_data, resolve_data_dir
from ..inject import MoELoRAConfig, inject_moe_lora, set_own_expert
from . import checkpoint
from .allocation import Allocation
from .client import ClientRunner, State, clone_state, payload_bytes, seed_for
from .config import FLConfig
from .faults import ClientFailure, FaultPlan, non_finite, poison
from .strategies import Layout, Strategy, make_strategy
from .strategies.base import HEAD, restored, select
from .strategies.fedlease import allocation_to_json
from .strategies.ifca import PICK_EXAMPLES


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
    initial_mean: float = float("nan")  # mean accuracy of the untrained model (random head)
    samples: dict = field(default_factory=dict)  # train/test examples per client
    resumed_from_round: int | None = None  # rounds already complete when this process resumed

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


def round_row(phase, r, clients, evals, losses, statuses, up, down, t0) -> dict:
    per_client = []
    for c, e, loss, st in zip(clients, evals, losses, statuses):
        per_client.append({"client": c.client_id, "task": c.task, "train_loss": loss, **st, **e})
    return {
        "round": r,
        "phase": phase,
        "mean_accuracy": float(np.nanmean([e["accuracy"] for e in evals])),
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


def reject_non_finite(
    update: State, status: dict, round_idx: int, cid: int, bad: list[str] | None = None
) -> bool:
    """Mark ``status`` rejected (and warn) when ``update`` holds NaN/Inf, or when ``bad`` (the
    non-finite tensors a remote client reported) is not empty; True if so."""
    bad = bad or non_finite(update)
    if bad:
        warnings.warn(f"round {round_idx}: rejected client {cid}'s update: "
                      f"non-finite values in {bad[:3]}", stacklevel=3)  # fmt: skip
        status.update(status="rejected", non_finite=bad[:3])
    return bool(bad)


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


def load_base(cfg: FLConfig):
    """The frozen model and tokenizer, its task head drawn from ``cfg.seed`` (every process that
    loads it for the same run, simulator or Flower node, gets the same head); sets ``threads``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    num_labels = max(TASKS[t].num_labels for t in cfg.clients)
    return models.load(cfg.model, num_labels=num_labels)


class ModelPool:
    """One client model per layout on a shared frozen base (adapters are swapped per client)."""

    def __init__(self, cfg: FLConfig, base, tokenizer, progress: bool) -> None:
        self.cfg, self.base, self.tokenizer, self.progress = cfg, base, tokenizer, progress
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
                trainable_modules=list(HEAD),
            )
            torch.manual_seed(cfg.seed)  # same seed, same initial adapters in every method
            model = inject_moe_lora(copy.deepcopy(self.base), mcfg, backend=cfg.backend)
            self.runners[layout] = ClientRunner(
                model,
                self.tokenizer.pad_token_id,
                cfg.lr,
                cfg.weight_decay,
                cfg.batch_size,
                cfg.eval_batch_size,
                cfg.local_epochs,
                self.progress,
            )
            self.templates[layout] = clone_state(adapter_state_dict(model))
        return self.runners[layout]

    def template(self, layout: Layout) -> State:
        self.runner(layout)
        return self.templates[layout]


def client_update(
    cfg: FLConfig,
    strategy: Strategy,
    pool: ModelPool,
    plan: FaultPlan,
    c,
    kept: State,
    received: State,
    r: int,
    desc: str,
) -> tuple[State | None, State | None, float | None, dict]:
    """One client's round: ``(new_state, upload, loss, status)``; state and upload are None when
    the client crashed (an injected ``ClientFailure``: it sends nothing, the round goes on). A new
    state holding NaN/Inf comes back with status ``rejected``: the client must not keep it, the
    server must not average its upload."""
    layout = strategy.layout(r)
    runner = pool.runner(layout)

    def loss_of(state: State) -> float:
        return runner.train_loss(c, state, PICK_EXAMPLES)

    state = strategy.client_state(c.client_id, pool.template(layout), kept, received, loss_of)
    steps = cfg.local_epochs * -(-len(c.train) // cfg.batch_size)
    try:
        new, loss = runner.train(
            c, state, seed_for(cfg.seed, r, c.client_id), strategy.own_expert(c.client_id, r),
            desc=desc, fail_at_step=plan.fail_at_step(r, c.client_id, steps),
            frozen=lambda key: strategy.frozen(key, r), training=strategy.training(r),
        )  # fmt: skip
    except ClientFailure as exc:
        warnings.warn(f"round {r}: {exc}", stacklevel=2)
        return None, None, None, {"status": "failed", "error": str(exc)}
    if plan.poisons(r, c.client_id):
        new = poison(new)
    status = {"status": "ok"}
    reject_non_finite(new, status, r, c.client_id)
    return new, strategy.up(c.client_id, r, new), loss, status


def run(
    cfg: FLConfig,
    output_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
) -> Summary:
    """Run ``cfg.method`` as configured; write artefacts to ``output_dir`` when given.

    With an output directory the run checkpoints after every round; ``resume=True`` continues
    from the last complete round found there (and gives the same result as an uninterrupted run:
    every client's randomness is seeded by run seed, round and client id).
    """
    out = Path(output_dir) if output_dir is not None else None
    ckpt = checkpoint.load(out) if resume and out else None
    t0 = time.time() - (ckpt.meta["elapsed_s"] if ckpt else 0.0)
    data_dir = resolve_data_dir(cfg.data_dir)
    base, tokenizer = load_base(cfg)
    clients = build_client_data(
        cfg.clients,
        tokenizer,
        cfg.train_samples,
        cfg.test_samples,
        cfg.max_seq_len,
        cfg.seed,
        cfg.label_alpha,
        data_dir,
    )
    weights = [float(len(c.train)) for c in clients]
    if out:  # only now: bad data stops the run before anything is written
        if not resume:
            clear_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    rec = Recorder(out, ckpt.meta["metrics"] if ckpt else None)
    comm = dict(ckpt.meta["comm"]) if ckpt else {"up": 0, "down": 0}
    done = ckpt.meta["rounds_done"] if ckpt else 0
    pool = ModelPool(cfg, base, tokenizer, progress)
    strategy = make_strategy(cfg, weights)
    strategy.setup(pool.template)
    plan = FaultPlan.from_config(cfg.faults)

    if ckpt:
        saved = checkpoint.unpack(ckpt.tensors)
        if "strategy" not in ckpt.meta:
            raise checkpoint.CheckpointError(f"checkpoint in {str(out)!r} has no strategy state")
        strategy.restore({g[2:]: t for g, t in saved.items() if g.startswith("s.")},
                         ckpt.meta["strategy"])  # fmt: skip
        kept_template = pool.template(strategy.layout(max(done - 1, 0)))
        kept = [restored(kept_template, saved, f"client{c.client_id}") for c in clients]
        initial_mean = ckpt.meta["initial_mean"]
    else:
        first = pool.template(strategy.layout(0))
        kept = [clone_state(first) for _ in clients]
        untrained = [pool.runner(strategy.layout(0)).evaluate(c, first) for c in clients]
        initial_mean = float(np.mean([e["accuracy"] for e in untrained]))

    def save_checkpoint(rounds_done: int) -> None:
        if not out:
            return
        groups, meta = strategy.state()
        tensors = checkpoint.pack({f"client{i}": st for i, st in enumerate(kept)}
                                  | {f"s.{g}": st for g, st in groups.items()})  # fmt: skip
        checkpoint.save(out, rounds_done, {"comm": comm, "metrics": rec.rows,
                        "initial_mean": initial_mean, "elapsed_s": time.time() - t0,
                        "strategy": meta}, tensors)  # fmt: skip

    if out and strategy.allocation is not None:  # resumed after the allocation
        write_clusters(out, strategy.allocation)
    total = strategy.total_rounds
    bar = tqdm(total=total, initial=done, desc="rounds", disable=not progress, unit="round")
    for r in range(done, total):
        up = down = 0
        wanted = strategy.collect(r)
        if wanted is not None:  # e.g. FedLEASE's allocation: every client uploads its adapter
            uploads = [select(k, wanted) for k in kept]
            up += sum(payload_bytes(u) for u in uploads)
            strategy.on_collect(r, uploads)
            if out and strategy.allocation is not None:
                write_clusters(out, strategy.allocation)
        losses, statuses, accepted = [], [], {}
        phase = strategy.phase(r)
        for c in clients:
            cid = c.client_id
            received = strategy.down(cid, r)
            down += payload_bytes(received)
            new, upload, loss, status = client_update(
                cfg, strategy, pool, plan, c, kept[cid], received, r,
                f"{phase} {r + 1} client {cid}",
            )  # fmt: skip
            losses.append(loss)
            statuses.append(status)
            if new is None:
                continue
            up += payload_bytes(upload)
            if status["status"] == "ok":
                accepted[cid] = upload
                kept[cid] = new
        check_survivors(statuses, r)
        strategy.aggregate(r, accepted)
        layout = strategy.layout(r)
        runner, template = pool.runner(layout), pool.template(layout)
        evals = []
        for c in clients:  # every client receives the aggregate and is evaluated on it
            cid = c.client_id
            kept[cid] = strategy.client_state(cid, template, kept[cid],
                                              strategy.down(cid, r, final=True))  # fmt: skip
            evals.append(runner.evaluate(c, kept[cid], strategy.own_expert(cid, r)))
        comm["up"] += up
        comm["down"] += down
        rec.add(round_row(phase, r, clients, evals, losses, statuses, up, down, t0))
        save_checkpoint(r + 1)
        bar.update()
        bar.set_postfix(acc=f"{rec.rows[-1]['mean_accuracy']:.3f}")
    bar.close()

    samples = {"train": [len(c.train) for c in clients], "test": [len(c.test) for c in clients]}
    summary = summarise(cfg, samples, strategy, rec.rows, comm, time.time() - t0)
    summary.initial_mean = initial_mean
    summary.resumed_from_round = done if ckpt else None
    if out:
        if total:
            write_adapters(out / "adapters", cfg, pool, strategy, clients, kept)
        (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
        from .plots import write_plots

        write_plots(out, strategy.allocation, rec.rows, cfg.clients, initial_mean)
    return summary


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
        extra = {"model": cfg.model, "num_labels": runner.model.config.num_labels,
                 "task": c.task, "max_seq_len": cfg.max_seq_len, "method": cfg.method,
                 "client": c.client_id}  # fmt: skip
        save_adapter(runner.model, directory / f"client{c.client_id}", extra)


def write_clusters(out: Path, alloc: Allocation) -> None:
    """``clusters.json``: the allocation as checkpoints record it, distances to 6 decimals."""
    record = allocation_to_json(alloc)
    record["distance_matrix"] = np.asarray(alloc.distance_matrix).round(6).tolist()
    (out / "clusters.json").write_text(json.dumps(record, indent=2) + "\n")


def summarise(
    cfg: FLConfig, samples: dict, strategy: Strategy, rows: list[dict], comm: dict, wall: float
) -> Summary:
    """The run's ``Summary`` from its metrics rows; ``samples``: train/test examples per client."""
    last = rows[-1]["clients"] if rows else []
    per_task: dict[str, list[float]] = {}
    for c in last:
        per_task.setdefault(c["task"], []).append(c["accuracy"])
    final = {  # NaN: a client whose evaluation never arrived (Flower); the means skip it
        "per_client": last,
        "per_task": {t: float(np.nanmean(v)) for t, v in per_task.items()},
        "mean": float(np.nanmean([c["accuracy"] for c in last])) if last else float("nan"),
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
