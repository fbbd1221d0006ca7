"""The Flower ``ClientApp``: one FedLEASE client per SuperNode, keyed by ``partition-id``.

Handlers (the server's message types):

* ``query`` with ``action = "hello"``: report task and sample counts, and the untrained model's
  accuracy; ``action = "collect"``: upload the kept tensors the strategy asks for.
* ``train``: merge the received tensors into the kept state, train, keep the result, upload.
* ``evaluate``: merge the round's aggregate into the kept state and evaluate it.

What the client keeps between rounds lives in ``context.state`` (it never leaves the node).
The frozen model and the tokenised data are cached per process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..data import build_client_data, resolve_data_dir
from ..data.tokenize import ClientData
from ..fl.client import clone_state
from ..fl.config import FLConfig
from ..fl.faults import FaultPlan
from ..fl.pool import ClientSide, ModelPool, load_base
from ..fl.strategies import Strategy, make_strategy
from ..fl.strategies.base import select
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


_NODES: dict[tuple, Node] = {}


def node_for(context: Context) -> Node:
    """This node's client: config from the run, partition and data directory from the node."""
    cfg, _ = parse_run_config(dict(context.run_config))
    if "partition-id" not in context.node_config:
        raise ValueError("the SuperNode needs --node-config 'partition-id=<i> ...'")
    pid = int(context.node_config["partition-id"])
    if not 0 <= pid < len(cfg.clients):
        raise ValueError(f"partition-id {pid} is outside 0..{len(cfg.clients) - 1}")
    data_dir = context.node_config.get("data-dir") or cfg.data_dir
    key = (json.dumps(cfg.to_dict(), sort_keys=True), pid, data_dir)
    if key not in _NODES:
        base, tokenizer = load_base(cfg)
        clients = build_client_data(cfg.clients, tokenizer, cfg.train_samples, cfg.test_samples,
                                    cfg.max_seq_len, cfg.seed, cfg.label_alpha,
                                    resolve_data_dir(data_dir), only=pid)  # fmt: skip
        pool = ModelPool(cfg, base, tokenizer, progress=False)
        strategy = make_strategy(cfg, [1.0] * len(cfg.clients))  # weights: server-side only
        strategy.setup(pool.template)
        _NODES[key] = Node(
            cfg, pid, clients[pid], pool, strategy, FaultPlan.from_config(cfg.faults)
        )
    return _NODES[key]


def _kept(node: Node, context: Context) -> State:
    if KEPT in context.state:
        return from_record(context.state[KEPT])
    return clone_state(node.pool.template(node.strategy.layout(0)))


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
        kept = _kept(node, context)
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
    new, upload, loss, status = side.update(node.data, _kept(node, context), received, r)
    if status["status"] == "ok":  # a crashed client has nothing, a NaN state is not kept
        context.state[KEPT] = to_record(new)
    report = {"status": status["status"], "error": status.get("error", ""),
              "non_finite": json.dumps(status.get("non_finite", []))}  # fmt: skip
    content = RecordDict({"up": to_record(upload or {}), "status": ConfigRecord(report)})
    if loss is not None:
        content["metrics"] = MetricRecord({"train_loss": loss})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = node_for(context)
    r = _sync(node, msg)
    strategy, layout = node.strategy, node.strategy.layout(r)
    kept = strategy.client_state(node.pid, node.pool.template(layout), _kept(node, context),
                                 from_record(msg.content["down"]))  # fmt: skip
    context.state[KEPT] = to_record(kept)
    result = node.pool.runner(layout).evaluate(node.data, kept, strategy.own_expert(node.pid, r))
    return Message(content=RecordDict({"metrics": MetricRecord(result)}), reply_to=msg)
