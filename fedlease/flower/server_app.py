"""The Flower ``ServerApp``: the round driver (``fedlease.fl.driver``) over Flower messages.

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
under which they saved their state. A fresh run needs ``output-dir`` new or empty, or
``overwrite = true`` to replace an earlier run there (``fedlease.fl.rundir``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..fl import checkpoint
from ..fl.config import FLConfig, metric_of, runtime
from ..fl.driver import RoundDriver, Summary
from ..fl.pool import ModelPool, load_base
from ..fl.strategies import Strategy
from ..fl.types import ClientInfo, Reply, State
from .records import ServerOptions, from_record, parse_run_config, to_record
from .records import round_config as make_round_config

app = ServerApp()
log = logging.getLogger("fedlease.flower")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, opts = parse_run_config(dict(context.run_config))
    summary = run_server(grid, cfg, opts)
    print(f"fedlease on Flower: mean {summary.final['metric']} {summary.mean_text()}, "
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


class FlowerTransport:
    """The clients as Flower SuperNodes, one per ``partition-id``: a ``hello`` query maps
    partition ids to nodes and brings each client's task, example counts and untrained score;
    then one message per client and round, with the strategy's public decisions and the run's
    token. The clients keep their own state, on their nodes; the checkpoint keeps the token under
    which they saved it, and every message of a resumed run names the round it resumed from."""

    device = precision = ""  # the nodes know where they train
    used_client_batch = 1  # a node trains its one client

    def __init__(self, grid: Grid, cfg: FLConfig, opts: ServerOptions) -> None:
        self.grid, self.cfg, self.opts = grid, cfg, opts
        self.token, self.resume_from = uuid.uuid4().hex[:16], 0

    def start(self) -> list[ClientInfo]:
        n, opts = len(self.cfg.clients), self.opts
        node_ids = wait_for_nodes(self.grid, n, opts.node_timeout)
        probe = Exchange(self.grid, dict(enumerate(node_ids)),
                         max(opts.round_timeout, opts.node_timeout))  # fmt: skip
        hello = {i: RecordDict({"config": make_round_config(-1, {}, action="hello")})
                 for i in range(len(node_ids))}  # fmt: skip
        nodes, infos, self._untrained = {}, {}, {}
        for reply in probe(MessageType.QUERY, hello).values():
            info = reply.content["info"]
            pid = int(info["partition-id"])
            if pid in nodes:
                raise RuntimeError(f"two nodes claim partition-id {pid}")
            nodes[pid] = reply.metadata.src_node_id
            infos[pid] = ClientInfo(pid, str(info["task"]), int(info["train"]), int(info["test"]))
            self._untrained[pid] = {k: float(v) for k, v in reply.content["metrics"].items()}
        missing = sorted(set(range(n)) - set(nodes))
        if missing:
            raise RuntimeError(f"no node answered for partition-id {missing} (of {n} clients)")
        self.exchange = Exchange(self.grid, nodes, opts.round_timeout)
        # The same initial tensors as every client's (drawn on the CPU before any device move); the
        # server trains nothing, so it needs neither the clients' device nor their precision.
        local = dataclasses.replace(self.cfg, device="cpu", precision="fp32")
        rt = runtime(local)
        self.pool = ModelPool(local, *load_base(local, rt), progress=False, rt=rt)
        return [infos[i] for i in range(n)]

    def template(self, layout):
        return self.pool.template(layout)

    def bind(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def untrained(self) -> list[dict]:
        return [self._untrained[i] for i in range(len(self.cfg.clients))]

    def _config(self, r: int, **extra):
        ids = {"run-token": self.token, "resume-from": self.resume_from}
        return make_round_config(r, self.strategy.public(), **extra, **ids)

    def collect(self, r: int, wanted) -> list[State]:
        n = len(self.cfg.clients)
        got = self.exchange(MessageType.QUERY, {
            i: RecordDict({"config": self._config(r, action="collect")}) for i in range(n)
        })  # fmt: skip
        if len(got) < n:
            raise RuntimeError(f"round {r}: the allocation needs every client's adapter; "
                               f"no reply from {sorted(set(range(n)) - set(got))}")  # fmt: skip
        return [from_record(got[i].content["up"]) for i in range(n)]

    def train(self, r: int, payloads: dict[int, State]) -> dict[int, Reply]:
        config = self._config(r)
        got = self.exchange(MessageType.TRAIN, {
            i: RecordDict({"down": to_record(p), "config": config}) for i, p in payloads.items()
        })  # fmt: skip
        replies = {}
        for i in payloads:
            if i not in got:
                why = self.exchange.why_missing(i)
                log.warning("round %d: client %d failed: %s", r, i, why)
                replies[i] = Reply.failed(why)
                continue
            replies[i] = reply_from(got[i].content)
        return replies

    def evaluate(self, r: int, finals: dict[int, State]) -> list[dict]:
        config, metric = self._config(r), metric_of(self.cfg)
        got = self.exchange(MessageType.EVALUATE, {
            i: RecordDict({"down": to_record(p), "config": config}) for i, p in finals.items()
        })  # fmt: skip
        evals = []
        for i in finals:
            if i in got:
                evals.append({k: float(v) for k, v in got[i].content["metrics"].items()})
            else:
                log.warning("round %d: client %d did not report its evaluation", r, i)
                evals.append({metric: float("nan"), "eval_loss": float("nan")})
        return evals

    def checkpoint(self):
        return {}, set(), {"run_token": self.token}

    def restore(self, ckpt: checkpoint.Checkpoint, groups) -> None:
        self.token, self.resume_from = ckpt.meta["run_token"], ckpt.meta["rounds_done"]
        log.info("resuming run %s after round %d", self.token, self.resume_from)

    def finish(self, out) -> None:
        """The clients' adapters stay on their nodes."""


def reply_from(content: RecordDict) -> Reply:
    """A training reply as the client made it (``ClientSide.update``'s ``Reply``)."""
    report = dict(content["status"])
    status = {"status": report["status"]}
    if report["error"]:
        status["error"] = report["error"]
    non_finite = json.loads(report["non_finite"])
    if non_finite:
        status["non_finite"] = non_finite
    metrics = content.get("metrics")
    loss = float(metrics["train_loss"]) if metrics else None
    upload = from_record(content["up"]) if report["status"] != "failed" else None
    return Reply(upload, loss, status)


def run_server(grid: Grid, cfg: FLConfig, opts: ServerOptions) -> Summary:
    """The round driver over Flower; a round needs ``min-results`` replies (0: every
    participant's)."""
    transport = FlowerTransport(grid, cfg, opts)
    driver = RoundDriver(cfg, transport, opts.output_dir, opts.resume, progress=False,
                         min_results=opts.min_results or len(cfg.clients),
                         overwrite=opts.overwrite)  # fmt: skip
    return driver.run()
