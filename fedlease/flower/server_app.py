"""The Flower ``ServerApp``: the simulator's round loop over Flower messages.

Per round: (``collect`` queries when the strategy asks, e.g. FedLEASE's allocation), one
``train`` message per client with its own payload, aggregation of the replies that arrived in
time, then one ``evaluate`` message per client with the aggregate. A client that does not answer
within ``round-timeout`` is logged as failed in ``metrics.jsonl`` and the round goes on with the
others, unless fewer than ``min-results`` replied (a reply whose upload the server rejects
counts; the round needs one usable update). Artefacts are those of ``fedlease run``.

After every round the server writes the simulator's checkpoint (``fedlease.fl.checkpoint``: the
strategy's state, metrics, communication) to ``output-dir``; the clients keep theirs on their
nodes. ``resume = true`` continues a run whose ServerApp died from the last complete round; every
message then tells the clients that round (``resume-from``) and the run's token (``run-token``)
under which they saved their state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import yaml
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..fl import checkpoint
from ..fl.client import payload_bytes
from ..fl.config import FLConfig, metric_of
from ..fl.participation import evaluated, participants
from ..fl.plots import write_plots
from ..fl.pool import ModelPool, load_base, reject_non_finite
from ..fl.robust import screen_round
from ..fl.simulator import (
    Recorder,
    Summary,
    clear_previous_run,
    round_row,
    summarise,
    write_clusters,
)
from ..fl.strategies import make_strategy
from .records import ServerOptions, from_record, parse_run_config, to_record
from .records import round_config as make_round_config

app = ServerApp()
log = logging.getLogger("fedlease.flower")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, opts = parse_run_config(dict(context.run_config))
    summary = run_server(grid, cfg, opts)
    print(f"fedlease on Flower: mean {summary.final['metric']} {summary.final['mean']:.4f}, "
          f"{summary.num_experts} experts, assignment {summary.assignment}; "
          f"artefacts in {opts.output_dir}")  # fmt: skip


class Exchange:
    """Sends one message per client (by partition id) and collects the replies that arrive
    within ``timeout``. Error replies (a crashed ClientApp, or the SuperLink answering for a
    node it lost) count as no reply; ``errors`` holds their reasons by partition id."""

    POLL_S = 0.5

    def __init__(self, grid: Grid, nodes: dict[int, int], timeout: float) -> None:
        self.grid, self.nodes, self.timeout = grid, nodes, timeout
        self.errors: dict[int, str] = {}

    def __call__(self, kind: str, contents: dict[int, RecordDict]) -> dict[int, Message]:
        pids = list(contents)
        msgs = [Message(content=contents[p], dst_node_id=self.nodes[p], message_type=kind)
                for p in pids]  # fmt: skip
        ids = list(self.grid.push_messages(msgs))
        waiting = dict(zip(ids, pids))
        replies: dict[int, Message] = {}
        self.errors = {}
        end = time.time() + self.timeout
        while waiting and time.time() < end:
            for reply in self.grid.pull_messages(list(waiting)):
                pid = waiting.pop(reply.metadata.reply_to_message_id, None)
                if pid is None:
                    continue
                if reply.has_error():
                    self.errors[pid] = reply.error.reason
                    log.warning("client %d: %s", pid, reply.error.reason)
                else:
                    replies[pid] = reply
            if waiting:
                time.sleep(self.POLL_S)
        return replies

    def why_missing(self, pid: int) -> str:
        return self.errors.get(pid) or f"no reply within {self.timeout} s"


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    start = time.time()
    while True:
        ids = list(grid.get_node_ids())
        if len(ids) >= n:
            return ids
        if time.time() - start > timeout:
            raise RuntimeError(f"only {len(ids)} of {n} client nodes connected within {timeout} s")
        time.sleep(1.0)


def run_server(grid: Grid, cfg: FLConfig, opts: ServerOptions) -> Summary:
    t0 = time.time()
    n, metric = len(cfg.clients), metric_of(cfg)
    node_ids = wait_for_nodes(grid, n, opts.node_timeout)
    hello = {i: RecordDict({"config": make_round_config(-1, {}, action="hello")})
             for i in range(len(node_ids))}  # fmt: skip
    probe = Exchange(grid, dict(enumerate(node_ids)), max(opts.round_timeout, opts.node_timeout))
    replies = probe(MessageType.QUERY, hello)
    nodes, clients, untrained = {}, {}, {}
    for reply in replies.values():
        info = reply.content["info"]
        pid = int(info["partition-id"])
        if pid in nodes:
            raise RuntimeError(f"two nodes claim partition-id {pid}")
        nodes[pid] = reply.metadata.src_node_id
        clients[pid] = SimpleNamespace(
            client_id=pid, task=str(info["task"]), train=int(info["train"]), test=int(info["test"])
        )
        untrained[pid] = float(reply.content["metrics"][metric])
    missing = sorted(set(range(n)) - set(nodes))
    if missing:
        raise RuntimeError(f"no node answered for partition-id {missing} (of {n} clients)")
    order = [clients[i] for i in range(n)]
    weights = [float(c.train) for c in order]
    exchange = Exchange(grid, nodes, opts.round_timeout)
    min_results = opts.min_results or n

    out = Path(opts.output_dir)
    ckpt = checkpoint.load(out) if opts.resume else None
    if not opts.resume:
        clear_previous_run(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    # The same initial tensors as every client's (drawn on the CPU before any device move); the
    # server trains nothing, so it needs neither the clients' device nor their precision.
    local = dataclasses.replace(cfg, device="cpu", precision="fp32")
    base, tokenizer = load_base(local)
    strategy = make_strategy(cfg, weights)
    strategy.setup(ModelPool(local, base, tokenizer, progress=False).template)
    done, token, resumed_from = 0, uuid.uuid4().hex[:16], None
    rec, comm = Recorder(out), {"up": 0, "down": 0}
    if ckpt is not None:
        done, token = ckpt.meta["rounds_done"], ckpt.meta["run_token"]
        resumed_from = done
        strategy.restore_checkpoint(checkpoint.unpack(ckpt.tensors), ckpt.meta["strategy"])
        rec, comm = Recorder(out, ckpt.meta["metrics"]), dict(ckpt.meta["comm"])
        t0 = time.time() - ckpt.meta["elapsed_s"]
        untrained = dict(enumerate(ckpt.meta["untrained"]))
        if strategy.allocation is not None:
            write_clusters(out, strategy.allocation)
        log.info("resuming run %s after round %d", token, done)

    def round_config(r: int, public: dict, **extra):
        return make_round_config(r, public, **extra, **{"run-token": token, "resume-from": done})

    def save_checkpoint(rounds_done: int) -> None:
        tensors, meta = strategy.checkpoint_state()
        checkpoint.save(out, rounds_done, {
            "comm": comm, "metrics": rec.rows, "elapsed_s": time.time() - t0, "strategy": meta,
            "run_token": token, "untrained": [untrained[i] for i in range(n)],
        }, tensors)  # fmt: skip

    for r in range(done, strategy.total_rounds):
        up = down = 0
        if strategy.collect(r) is not None:
            msgs = {i: RecordDict({"config": round_config(r, strategy.public(),
                                                          action="collect")})
                    for i in range(n)}  # fmt: skip
            got = exchange(MessageType.QUERY, msgs)
            if len(got) < n:
                raise RuntimeError(f"round {r}: the allocation needs every client's adapter; "
                                   f"no reply from {sorted(set(range(n)) - set(got))}")  # fmt: skip
            uploads = [from_record(got[i].content["up"]) for i in range(n)]
            up += sum(payload_bytes(u) for u in uploads)
            strategy.on_collect(r, uploads)
            write_clusters(out, strategy.allocation)
        public = strategy.public()
        ids = participants(cfg, r, strategy.samples(r))  # the simulator's draw, same seed
        payloads = {i: strategy.down(i, r) for i in ids}
        down += sum(payload_bytes(p) for p in payloads.values())
        got = exchange(MessageType.TRAIN, {
            i: RecordDict({"down": to_record(p), "config": round_config(r, public)})
            for i, p in payloads.items()
        })  # fmt: skip
        statuses = [{"status": "idle"} for _ in range(n)]
        losses, accepted = [None] * n, {}
        for i in ids:
            if i not in got:
                why = exchange.why_missing(i)
                log.warning("round %d: client %d failed: %s", r, i, why)
                statuses[i] = {"status": "failed", "error": why}
                continue
            content = got[i].content
            status = dict(content["status"])
            metrics = content.get("metrics")
            losses[i] = float(metrics["train_loss"]) if metrics else None
            st = {"status": status["status"]}
            if status["error"]:
                st["error"] = status["error"]
            if status["status"] != "failed":
                upload = from_record(content["up"])
                up += payload_bytes(upload)
                reported = json.loads(status["non_finite"])  # what the client found in its state
                if not reject_non_finite(upload, st, r, i, reported):
                    accepted[i] = upload
            statuses[i] = st
        accepted = screen_round(strategy, r, accepted, statuses, cfg.max_norm_ratio)
        # replies count whether or not their upload was usable (a rejected upload is the
        # client's fault, not the round's); the round still needs one usable update
        answered = sum(statuses[i]["status"] in ("ok", "rejected") for i in ids)
        ok = sum(statuses[i]["status"] == "ok" for i in ids)
        if answered < min(min_results, len(ids)) or ok == 0:
            raise RuntimeError(f"round {r}: {answered} clients answered ({ok} usable updates), "
                               f"min-results = {min_results}: {statuses}")  # fmt: skip
        strategy.aggregate(r, accepted)
        evals = None
        if evaluated(cfg, r, strategy.total_rounds):
            final = {i: strategy.down(i, r, final=True) for i in range(n)}
            got = exchange(MessageType.EVALUATE, {
                i: RecordDict({"down": to_record(p), "config": round_config(r, strategy.public())})
                for i, p in final.items()
            })  # fmt: skip
            evals = []
            for i in range(n):
                if i in got:
                    evals.append({k: float(v) for k, v in got[i].content["metrics"].items()})
                else:
                    log.warning("round %d: client %d did not report its evaluation", r, i)
                    evals.append({metric: float("nan"), "eval_loss": float("nan")})
        comm["up"] += up
        comm["down"] += down
        rec.add(round_row(strategy.phase(r), r, order, evals, losses, statuses, up, down, t0, ids,
                          metric))  # fmt: skip
        save_checkpoint(r + 1)
        log.info("round %d/%d: mean %s %.4f", r + 1, strategy.total_rounds, metric,
                 rec.rows[-1][f"mean_{metric}"])  # fmt: skip

    samples = {"train": [c.train for c in order], "test": [c.test for c in order]}
    summary = summarise(cfg, samples, strategy, rec.rows, comm, time.time() - t0)
    summary.initial_mean = float(np.mean([untrained[i] for i in range(n)]))
    summary.resumed_from_round = resumed_from
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    write_plots(out, strategy.allocation, rec.rows, cfg.clients, summary.initial_mean)
    return summary
