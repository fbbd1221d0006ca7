"""FedLEASE in one process: warm-up, allocation, adaptive rounds, evaluation, artefacts."""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from .. import models
from ..adapter_io import adapter_state_dict, check_state_dict
from ..data import TASKS, build_client_data, resolve_data_dir
from ..inject import MoELoRAConfig, inject_moe_lora
from . import checkpoint
from .allocation import Allocation, allocate, average, b_distance_matrix, init_experts
from .client import ClientRunner, State, clone_state, payload_bytes, seed_for
from .config import FLConfig
from .faults import ClientFailure, FaultPlan, non_finite, poison

HEAD = ("classifier",)


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


def _is_head(key: str) -> bool:
    return key.split(".")[0] in HEAD


def _is_expert(key: str) -> bool:
    return key.endswith((".lora_A", ".lora_B"))


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


def _round_row(phase, r, clients, evals, losses, statuses, up, down, t0) -> dict:
    per_client = []
    for c, e, loss, st in zip(clients, evals, losses, statuses):
        per_client.append({"client": c.client_id, "task": c.task, "train_loss": loss, **st, **e})
    return {
        "round": r,
        "phase": phase,
        "mean_accuracy": float(np.mean([e["accuracy"] for e in evals])),
        "clients": per_client,
        "failed": [c.client_id for c, st in zip(clients, statuses) if st["status"] == "failed"],
        "rejected": [c.client_id for c, st in zip(clients, statuses) if st["status"] == "rejected"],
        "bytes_up": up,
        "bytes_down": down,
        "wall_s": time.time() - t0,
    }


def _check_survivors(statuses: list[dict], round_idx: int) -> None:
    if all(st["status"] != "ok" for st in statuses):
        raise RuntimeError(f"round {round_idx}: no client update survived ({statuses})")


def run(
    cfg: FLConfig,
    output_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
) -> Summary:
    """Run FedLEASE as configured; write artefacts to ``output_dir`` when given.

    With an output directory the run checkpoints after every round; ``resume=True`` continues
    from the last complete round found there (and gives the same result as an uninterrupted run:
    every client's randomness is seeded by run seed, round and client id).
    """
    out = Path(output_dir) if output_dir is not None else None
    ckpt = checkpoint.load(out) if resume and out else None
    t0 = time.time() - (ckpt.meta["elapsed_s"] if ckpt else 0.0)
    data_dir = resolve_data_dir(cfg.data_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    num_labels = max(TASKS[t].num_labels for t in cfg.clients)
    base, tokenizer = models.load(cfg.model, num_labels=num_labels)
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
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    rec = Recorder(out, ckpt.meta["metrics"] if ckpt else None)
    comm = dict(ckpt.meta["comm"]) if ckpt else {"up": 0, "down": 0}
    done = ckpt.meta["rounds_done"] if ckpt else 0
    saved = checkpoint.unpack(ckpt.tensors) if ckpt else {}

    def save_checkpoint(rounds_done: int, groups: dict[str, State], alloc=None) -> None:
        if not out:
            return
        meta = {"comm": comm, "metrics": rec.rows, "initial_mean": initial_mean,
                "elapsed_s": time.time() - t0,
                "allocation": None if alloc is None else _alloc_json(alloc)}  # fmt: skip
        checkpoint.save(out, rounds_done, meta, checkpoint.pack(groups))

    def make_model(num_experts: int, routing: str):
        mcfg = MoELoRAConfig(
            num_experts=num_experts,
            rank=cfg.rank,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            routing=routing,
            target_modules=list(cfg.target_modules),
            trainable_modules=list(HEAD),
        )
        torch.manual_seed(cfg.seed)
        return inject_moe_lora(copy.deepcopy(base), mcfg, backend=cfg.backend)

    def runner(model) -> ClientRunner:
        return ClientRunner(
            model,
            tokenizer.pad_token_id,
            cfg.lr,
            cfg.weight_decay,
            cfg.batch_size,
            cfg.eval_batch_size,
            cfg.local_epochs,
            progress,
        )

    plan = FaultPlan.from_config(cfg.faults)

    def local_update(trainer: ClientRunner, c, state: State, round_idx: int, own, desc: str):
        """Train client ``c``: ``(new_state or None, loss or None, status)``. A client that crashes
        (an injected ``ClientFailure``) sends nothing; the run goes on with the others."""
        steps = cfg.local_epochs * -(-len(c.train) // cfg.batch_size)
        try:
            new, loss = trainer.train(
                c, state, seed_for(cfg.seed, round_idx, c.client_id), own, desc=desc,
                fail_at_step=plan.fail_at_step(round_idx, c.client_id, steps),
            )  # fmt: skip
        except ClientFailure as exc:
            warnings.warn(f"round {round_idx}: {exc}", stacklevel=2)
            return None, None, {"status": "failed", "error": str(exc)}
        if plan.poisons(round_idx, c.client_id):
            new = poison(new)
        return new, loss, {"status": "ok"}

    def reject_non_finite(update: State, status: dict, round_idx: int, cid: int) -> bool:
        bad = non_finite(update)
        if bad:
            warnings.warn(f"round {round_idx}: rejected client {cid}'s update: "
                          f"non-finite values in {bad[:3]}", stacklevel=2)  # fmt: skip
            status.update(status="rejected", non_finite=bad[:3])
        return bool(bad)

    total_rounds = cfg.warmup_rounds + cfg.rounds
    rounds_bar = tqdm(
        total=total_rounds, initial=done, desc="rounds", disable=not progress, unit="round"
    )

    # 1. Warm-up: one plain LoRA (a single dense expert) per client.
    warm = runner(make_model(1, "dense"))
    init = clone_state(adapter_state_dict(warm.model))
    if ckpt:
        initial_mean = ckpt.meta["initial_mean"]
    else:
        initial = [warm.evaluate(c, init) for c in clients]
        initial_mean = float(np.mean([e["accuracy"] for e in initial]))
    if "client0" in saved:
        states = [_group(saved, f"client{c.client_id}") for c in clients]
        for i, st in enumerate(states):
            _check_restored(init, st, f"checkpoint client{i}")
    else:
        states = [clone_state(init) for _ in clients]
    for r in range(done, cfg.warmup_rounds):
        losses, statuses = [], []
        for c in clients:
            new, loss, status = local_update(
                warm, c, states[c.client_id], r, None, f"warm-up {r + 1} client {c.client_id}"
            )
            if new is not None and not reject_non_finite(new, status, r, c.client_id):
                states[c.client_id] = new
            losses.append(loss)
            statuses.append(status)
        _check_survivors(statuses, r)
        up = down = 0
        if cfg.warmup_aggregate:  # FedAvg of the LoRA over the clients whose update survived
            alive = [i for i, st in enumerate(statuses) if st["status"] == "ok"]
            ups = [{k: v for k, v in states[i].items() if _is_expert(k)} for i in alive]
            up = sum(payload_bytes(p) for p in ups)
            avg = {k: average([p[k] for p in ups], [weights[i] for i in alive]) for k in ups[0]}
            for s in states:
                s.update(clone_state(avg))
            down = payload_bytes(avg) * len(clients)
        comm["up"] += up
        comm["down"] += down
        evals = [warm.evaluate(c, states[c.client_id]) for c in clients]
        rec.add(_round_row("warmup", r, clients, evals, losses, statuses, up, down, t0))
        save_checkpoint(r + 1, {f"client{i}": st for i, st in enumerate(states)})
        rounds_bar.update()
        rounds_bar.set_postfix(acc=f"{rec.rows[-1]['mean_accuracy']:.3f}")

    if ckpt and ckpt.meta["allocation"] is not None:
        alloc = _alloc_from_json(ckpt.meta["allocation"])
        k_total = alloc.num_experts
    else:
        # 2. Allocation: every client uploads its adapter; the server clusters B, builds experts.
        uploads = [{k: v for k, v in s.items() if _is_expert(k)} for s in states]
        comm["up"] += sum(payload_bytes(p) for p in uploads)
        alloc = allocate(b_distance_matrix(uploads), cfg.max_experts, cfg.num_experts)
        k_total = alloc.num_experts
        experts = init_experts(uploads, alloc.assignment, weights)
    if out:
        _write_clusters(out, alloc)

    # 3-4. Adaptive phase: all experts down, own expert + router up, averaged per cluster.
    moe = runner(make_model(k_total, "adaptive"))
    template = adapter_state_dict(moe.model)
    routers = {k: v.clone() for k, v in template.items() if k.endswith(".router")}
    if "experts" in saved:
        experts = _group(saved, "experts")
        cluster_routers = [_group(saved, f"router{k}") for k in range(k_total)]
        heads = [_group(saved, f"head{c.client_id}") for c in clients]
        expert_keys = {k: v for k, v in template.items() if _is_expert(k)}
        _check_restored(expert_keys, experts, "checkpoint experts")
        for k, rt in enumerate(cluster_routers):
            _check_restored(routers, rt, f"checkpoint router{k}")
        head_keys = {k: v for k, v in template.items() if _is_head(k)}
        for i, h in enumerate(heads):
            _check_restored(head_keys, h, f"checkpoint head{i}")
    else:
        cluster_routers = [clone_state(routers) for _ in range(k_total)]
        heads = [{k: v for k, v in s.items() if _is_head(k)} for s in states]
    for r in range(max(done - cfg.warmup_rounds, 0), cfg.rounds):
        round_idx = cfg.warmup_rounds + r
        losses, statuses, accepted, up, down = [], [], {}, 0, 0
        for c in clients:
            own = alloc.assignment[c.client_id]
            down_msg = {**experts, **cluster_routers[own]}
            down += payload_bytes(down_msg)
            state = {**clone_state(down_msg), **heads[c.client_id]}
            new, loss, status = local_update(
                moe, c, state, round_idx, own, f"round {round_idx + 1} client {c.client_id}"
            )
            losses.append(loss)
            statuses.append(status)
            if new is None:
                continue
            upload = {
                k: (v[own] if _is_expert(k) else v)
                for k, v in new.items()
                if _is_expert(k) or k.endswith(".router")
            }
            up += payload_bytes(upload)
            if not reject_non_finite(upload, status, round_idx, c.client_id):
                accepted[c.client_id] = upload
                heads[c.client_id] = {k: v for k, v in new.items() if _is_head(k)}
        _check_survivors(statuses, round_idx)
        experts, cluster_routers = _aggregate(
            experts, cluster_routers, accepted, alloc.assignment, weights
        )
        comm["up"] += up
        comm["down"] += down
        evals = [
            moe.evaluate(
                c,
                {**experts, **cluster_routers[alloc.assignment[c.client_id]], **heads[c.client_id]},
                alloc.assignment[c.client_id],
            )
            for c in clients
        ]
        rec.add(_round_row("adaptive", round_idx, clients, evals, losses, statuses, up, down, t0))
        groups = {"experts": experts}
        groups |= {f"router{k}": rt for k, rt in enumerate(cluster_routers)}
        groups |= {f"head{i}": h for i, h in enumerate(heads)}
        save_checkpoint(round_idx + 1, groups, alloc)
        rounds_bar.update()
        rounds_bar.set_postfix(acc=f"{rec.rows[-1]['mean_accuracy']:.3f}")
    rounds_bar.close()

    summary = _summarise(cfg, clients, alloc, rec.rows, comm, time.time() - t0)
    summary.initial_mean = initial_mean
    summary.resumed_from_round = done if ckpt else None
    if out:
        (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
        from .plots import write_plots

        write_plots(out, alloc, rec.rows, cfg.clients, initial_mean)
    return summary


def _aggregate(
    experts: State,
    routers: list[State],
    ups: dict[int, State],
    assignment: list[int],
    weights: list[float],
) -> tuple[State, list[State]]:
    """Expert k and cluster k's router := sample-weighted mean of the accepted uploads of cluster
    k's members (``ups``: client id -> upload); a cluster with none keeps its previous ones."""
    new_experts = {key: t.clone() for key, t in experts.items()}
    new_routers = []
    for k, previous in enumerate(routers):
        members = [i for i, a in enumerate(assignment) if a == k and i in ups]
        if not members:
            new_routers.append(previous)
            continue
        w = [weights[i] for i in members]
        for key in experts:
            new_experts[key][k] = average([ups[i][key] for i in members], w)
        new_routers.append({key: average([ups[i][key] for i in members], w) for key in previous})
    return new_experts, new_routers


def _group(saved: dict[str, State], name: str) -> State:
    if name not in saved:
        raise checkpoint.CheckpointError(f"the checkpoint holds no tensors for {name!r}")
    return saved[name]


def _check_restored(expected: State, got: State, source: str) -> None:
    try:
        check_state_dict(expected, got, source)
    except ValueError as exc:
        raise checkpoint.CheckpointError(str(exc)) from exc


def _alloc_json(alloc: Allocation) -> dict:
    return {
        "num_experts": alloc.num_experts,
        "assignment": alloc.assignment,
        "silhouette": {str(k): v for k, v in alloc.silhouette.items()},
        "distance_matrix": alloc.distance_matrix.tolist(),
    }


def _alloc_from_json(d: dict) -> Allocation:
    return Allocation(
        d["num_experts"],
        d["assignment"],
        {int(k): v for k, v in d["silhouette"].items()},
        np.asarray(d["distance_matrix"]),
    )


def _write_clusters(out: Path, alloc: Allocation) -> None:
    (out / "clusters.json").write_text(
        json.dumps(
            {
                "num_experts": alloc.num_experts,
                "assignment": alloc.assignment,
                "silhouette": {str(k): v for k, v in alloc.silhouette.items()},
                "distance_matrix": alloc.distance_matrix.round(6).tolist(),
            },
            indent=2,
        )
        + "\n"
    )


def _summarise(
    cfg: FLConfig, clients, alloc: Allocation, rows: list[dict], comm: dict, wall: float
) -> Summary:
    last = rows[-1]["clients"] if rows else []
    per_task: dict[str, list[float]] = {}
    for c in last:
        per_task.setdefault(c["task"], []).append(c["accuracy"])
    final = {
        "per_client": last,
        "per_task": {t: float(np.mean(v)) for t, v in per_task.items()},
        "mean": float(np.mean([c["accuracy"] for c in last])) if last else float("nan"),
    }
    samples = {"train": [len(c.train) for c in clients], "test": [len(c.test) for c in clients]}
    return Summary(
        cfg.method,
        alloc.num_experts,
        alloc.assignment,
        final,
        dict(comm),
        wall,
        len(rows),
        list(cfg.clients),
        samples=samples,
    )
