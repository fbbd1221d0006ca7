"""The Flower ``ClientApp``: one FedLEASE client per SuperNode, keyed by ``partition-id``.

Handlers (the server's message types):

* ``query`` with ``action = "hello"``: report task and sample counts, and the untrained model's
  accuracy; ``action = "collect"``: upload the kept tensors the strategy asks for.
* ``train``: merge the received tensors into the kept state, train, keep the result, upload.
* ``evaluate``: merge the round's aggregate into the kept state and evaluate it.

What the client keeps between rounds lives in ``context.state`` (it never leaves the node) and,
after every training and evaluation, in a file on the node (``state-dir`` from the node config,
else ``<output-dir>/client-states``, per run token and client): a run resumed after the ServerApp
died is a new Flower run with an empty ``context.state``, and each client continues from its own
file for the last complete round. The frozen model and the tokenised data are cached per process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..data.sources import build_client_data, source_for
from ..data.tokenize import ClientData
from ..fl import checkpoint
from ..fl.config import ConfigError, FLConfig, runtime
from ..fl.faults import FaultPlan
from ..fl.limits import check_model_fits
from ..fl.pool import ClientSide, ModelPool, load_base
from ..fl.strategies import Strategy, make_strategy
from ..fl.strategies.base import select
from ..fl.types import clone_state
from .records import State, from_record, parse_run_config, to_record

app = ClientApp()
KEPT = "kept"


@dataclass
class Node:
    cfg: FLConfig
    pid: int
    data: ClientData
    pool: ModelPool
    strategy: Strategy
    plan: FaultPlan
    state_dir: Path


_NODES: dict[tuple, Node] = {}


def node_for(context: Context) -> Node:
    """This node's client: config from the run, partition and data directory from the node."""
    cfg, opts = parse_run_config(dict(context.run_config))
    if "partition-id" not in context.node_config:
        raise ConfigError("node config: the SuperNode needs --node-config 'partition-id=<i> ...'")
    value = context.node_config["partition-id"]
    if isinstance(value, bool) or not (isinstance(value, int) or str(value).isdigit()):
        raise ConfigError(f"node config partition-id {value!r} is not a client index (0, 1, ...)")
    pid = int(value)
    if not 0 <= pid < len(cfg.clients):
        raise ConfigError(f"node config partition-id {pid} is outside 0..{len(cfg.clients) - 1}")
    data_dir = context.node_config.get("data-dir") or cfg.data_dir
    key = (json.dumps(cfg.to_dict(), sort_keys=True), pid, data_dir)
    if key not in _NODES:
        rt = runtime(cfg)
        base, tokenizer = load_base(cfg, rt)
        check_model_fits(cfg, base, 1)
        clients = build_client_data(cfg.clients, tokenizer, cfg.train_samples, cfg.test_samples,
                                    cfg.max_seq_len, cfg.seed, cfg.label_alpha,
                                    source_for(cfg.task_type).resolve(data_dir), only=pid,
                                    task_type=cfg.task_type)  # fmt: skip
        pool = ModelPool(cfg, base, tokenizer, progress=False, rt=rt)
        strategy = make_strategy(cfg, [1.0] * len(cfg.clients))  # weights: server-side only
        strategy.setup(pool.template)
        state_dir = Path(context.node_config.get("state-dir") or Path(opts.output_dir)
                         / "client-states")  # fmt: skip
        _NODES[key] = Node(
            cfg, pid, clients[pid], pool, strategy, FaultPlan.from_config(cfg.faults), state_dir
        )
    return _NODES[key]


def _files(node: Node, msg: Message) -> Path:
    return node.state_dir / str(msg.content["config"]["run-token"]) / f"client{node.pid}"


def _kept(node: Node, context: Context, msg: Message) -> State:
    """What this client kept: from ``context.state``; in a resumed run, first from its file of
    the last round before the one resumed; else a fresh model's tensors."""
    if KEPT in context.state:
        return from_record(context.state[KEPT])
    resume_from = int(msg.content["config"]["resume-from"])
    if resume_from > 0:
        saved = checkpoint.load_client_state(_files(node, msg), resume_from)
        if saved is not None:
            return saved
    return clone_state(node.pool.template(node.strategy.layout(0)))


def _keep(node: Node, context: Context, msg: Message, state: State, r: int, step: int) -> None:
    context.state[KEPT] = to_record(state)
    checkpoint.save_client_state(_files(node, msg), r, step, state)


def _sync(node: Node, msg: Message) -> int:
    config = msg.content["config"]
    node.strategy.set_public(json.loads(config["public"]))
    return int(config["round"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    node = node_for(context)
    action = msg.content["config"]["action"]
    if action == "hello":
        layout = node.strategy.layout(0)
        untrained = node.pool.runner(layout).evaluate(node.data, node.pool.template(layout))
        info = ConfigRecord({"partition-id": node.pid, "task": node.data.task,
                             "train": len(node.data.train), "test": len(node.data.test),
                             "pid": os.getpid()})  # fmt: skip
        content = RecordDict({"info": info, "metrics": MetricRecord(untrained)})
    elif action == "collect":
        r = _sync(node, msg)
        wanted = node.strategy.collect(r)
        kept = _kept(node, context, msg)
        content = RecordDict({"up": to_record(select(kept, wanted) if wanted else {})})
    else:
        raise ValueError(f"unknown query action {action!r}")
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = node_for(context)
    r = _sync(node, msg)
    received = from_record(msg.content["down"])
    side = ClientSide(node.cfg, node.strategy, node.pool, node.plan)
    new, reply = side.update(node.data, _kept(node, context, msg), received, r)
    status = reply.status
    if status["status"] == "ok":  # a crashed client has nothing, a NaN state is not kept
        _keep(node, context, msg, new, r, 0)
    report = {"status": status["status"], "error": status.get("error", ""),
              "non_finite": json.dumps(status.get("non_finite", []))}  # fmt: skip
    content = RecordDict({"up": to_record(reply.upload or {}), "status": ConfigRecord(report)})
    if reply.loss is not None:
        content["metrics"] = MetricRecord({"train_loss": reply.loss})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = node_for(context)
    r = _sync(node, msg)
    strategy, layout = node.strategy, node.strategy.layout(r)
    kept = strategy.client_state(node.pid, node.pool.template(layout), _kept(node, context, msg),
                                 from_record(msg.content["down"]))  # fmt: skip
    _keep(node, context, msg, kept, r, 1)
    result = node.pool.runner(layout).evaluate(node.data, kept, strategy.own_expert(node.pid, r))
    return Message(content=RecordDict({"metrics": MetricRecord(result)}), reply_to=msg)
