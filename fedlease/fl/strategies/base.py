"""What every federated method shares: the client model layout, the payloads, the server state.

A method is a ``Strategy``. The driver (the in-process simulator or the Flower apps) runs the same
loop for all of them; per round and client it asks the strategy

* ``layout(r)``: which client model to build (number of LoRA experts, routing);
* ``down(cid, r)``: the tensors the server sends the client (counted as bytes down);
* ``client_state(...)``: on the client, the tensors training starts from, given the template of
  a fresh model, what the client kept from earlier rounds and what it received; where it has
  ``candidates(...)`` to choose from (IFCA), by their losses (``losses_of``, which the
  in-process engine computes for a lockstep group's clients together);
* ``own_expert(cid, r)`` / ``frozen(key, r)``: which expert row trains, which tensors never do;
* ``up(cid, r, new)``: the tensors the client sends back (counted as bytes up);
* ``aggregate(r, ups)``: the server update from the accepted uploads, combined by
  ``self.combine`` (the config's ``aggregation`` rule: the weighted mean unless set otherwise);
* ``check_upload(cid, r, upload)``: why the server must reject an upload (None: accept it), and
  ``group_of(cid, r, upload)``: which uploads aggregate together (for the norm bound).

``collect(r)`` lets a method ask every client for part of its kept state before round ``r``
(FedLEASE's allocation). A client keeps everything it trained (task head, personal adapters);
after aggregation it receives ``down(cid, r, final=True)`` and merges it, and that is the state
it is evaluated on. Heads stay on their client in every method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...adapter_io import check_state_dict
from ..allocation import average
from ..checkpoint import CheckpointError, pack
from ..robust import Aggregation, validate_upload
from ..types import Layout, State, TrainSpec

HEAD = ("classifier",)


def is_expert(key: str) -> bool:
    return key.endswith((".lora_A", ".lora_B"))


def is_lora_a(key: str) -> bool:
    return key.endswith(".lora_A")


def is_lora_b(key: str) -> bool:
    return key.endswith(".lora_B")


def is_router(key: str) -> bool:
    return key.endswith(".router")


def is_head(key: str) -> bool:
    return key.split(".")[0] in HEAD


def select(state: State, keep: Callable[[str], bool]) -> State:
    return {k: v for k, v in state.items() if keep(k)}


def weighted_mean(ups: list[State], weights: list[float]) -> State:
    """Key-wise sample-weighted mean of states with the same keys."""
    return {k: average([u[k] for u in ups], weights) for k in ups[0]}


def merge(template: State, kept: State, received: State) -> State:
    """A fresh copy of ``template`` overlaid with the kept tensors that still fit (same name and
    shape: a layout change drops the rest), then with the received ones, which must fit."""
    out = {k: v.detach().clone() for k, v in template.items()}
    for k, v in kept.items():
        if k in out and out[k].shape == v.shape:
            out[k] = v.detach().clone()
    for k, v in received.items():
        if k not in out or out[k].shape != v.shape:
            want = tuple(out[k].shape) if k in out else "absent"
            raise ValueError(f"received tensor {k!r} of shape {tuple(v.shape)} does not fit the "
                             f"client model ({want})")  # fmt: skip
        out[k] = v.detach().clone()
    return out


def restored(expected: State, groups: dict[str, State], name: str) -> State:
    """Checkpoint group ``name``, refused (naming the tensor) unless it matches ``expected``."""
    if name not in groups:
        raise CheckpointError(f"the checkpoint holds no tensors for {name!r}")
    try:
        check_state_dict(expected, groups[name], f"checkpoint {name}")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    return groups[name]


def checked_choices(values, n: int, k: int, entry: str, every: bool = False) -> list[int]:
    """A checkpoint's per-client choice among ``k`` (an expert, a copy): ``n`` integers in
    ``0..k-1`` (with ``every``, each of them used), else ``CheckpointError`` naming ``entry``."""
    ok = isinstance(values, list) and len(values) == n
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < k for v in values)
    if not ok or (every and set(values) != set(range(k))):
        what = f"{n} integers in 0..{k - 1}" + (", each used" if every else "")
        raise CheckpointError(f"checkpoint {entry} = {str(values)[:200]} is not {what}")
    return list(values)


class Strategy:
    """The defaults: one plain LoRA per client, nothing sent, nothing aggregated (``local``)."""

    name = "local"
    pick_examples = 0  # training examples a client's loss over its candidates is measured on

    def __init__(self, cfg, weights: list[float]) -> None:
        self.cfg = cfg
        self.weights = list(weights)
        self.n = len(weights)
        self.total_rounds = cfg.warmup_rounds + cfg.rounds
        self.combine = Aggregation.from_config(getattr(cfg, "aggregation", None))

    # -- plan ----------------------------------------------------------------------------------
    def layout(self, r: int) -> Layout:
        return Layout()

    def phase(self, r: int) -> str:
        return "train"

    def samples(self, r: int) -> bool:
        """Whether round ``r`` trains only the drawn ``clients_per_round`` (else every client)."""
        return True

    def setup(self, template: Callable[[Layout], State]) -> None:
        """Called once before round 0 with a function giving a fresh model's adapter state."""
        self.template = template

    # -- server side ---------------------------------------------------------------------------
    def collect(self, r: int) -> Callable[[str], bool] | None:
        """Before round ``r``: which kept tensors every client must upload (None: nothing)."""
        return None

    def on_collect(self, r: int, uploads: list[State]) -> None:
        raise NotImplementedError

    def down(self, cid: int, r: int, final: bool = False) -> State:
        return {}

    def aggregate(self, r: int, ups: dict[int, State]) -> None:
        """``ups``: client id -> accepted upload (failed and rejected clients are absent)."""

    def expected_up(self, cid: int, r: int) -> State:
        """Tensors of the names, shapes and dtypes client ``cid``'s round-``r`` upload must have."""
        return self.up(cid, r, self.template(self.layout(r)))

    def check_upload(self, cid: int, r: int, upload: State) -> str | None:
        """Why ``upload`` must be rejected (wrong names, shapes, dtypes; NaN/Inf), or None."""
        return validate_upload(self.expected_up(cid, r), upload)

    def group_of(self, cid: int, r: int, upload: State) -> int:
        """Uploads of the same group are combined into one aggregate (norms compare within it)."""
        return 0

    # -- client side ---------------------------------------------------------------------------
    def candidates(self, cid: int, template: State, kept: State, received: State
                   ) -> list[State] | None:  # fmt: skip
        """The states client ``cid`` picks its starting state from by its loss on
        ``pick_examples`` of its training examples (IFCA's copies), or None: no choice."""
        return None

    def client_state(
        self,
        cid: int,
        template: State,
        kept: State,
        received: State,
        losses_of: Callable[[list[State], int], list[float]] | None = None,
    ) -> State:
        return merge(template, kept, received)

    def own_expert(self, cid: int, r: int) -> int | None:
        return None

    def frozen(self, key: str, r: int) -> bool:
        return False

    def training(self, r: int) -> TrainSpec | None:
        """How clients train in round ``r``; None: AdamW at the run's ``lr`` and weight decay
        on the plain loss."""
        return None

    def up(self, cid: int, r: int, new: State) -> State:
        return {}

    # -- results and checkpoints ---------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return 1

    def assignment(self) -> list[int]:
        """The model (expert, cluster, copy) each client ends up with."""
        return [0] * self.n

    @property
    def allocation(self):
        """FedLEASE's clustering (an ``Allocation``), when the method has one."""
        return None

    def public(self) -> dict:
        """The server's decisions a client needs to run the client-side methods (JSON); a
        driver whose clients run elsewhere sends it with every message."""
        return {}

    def set_public(self, public: dict) -> None:
        """On a remote client: adopt the server's ``public()``."""

    def state(self) -> tuple[dict[str, State], dict]:
        """Server state as named tensor groups plus JSON metadata (for checkpoints)."""
        return {}, {}

    def restore(self, groups: dict[str, State], meta: dict) -> None:
        """Inverse of ``state()``; the driver has called ``setup`` already."""

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``state()`` for a checkpoint: the tensor groups packed under ``s.<group>``, the JSON."""
        groups, meta = self.state()
        return pack({f"s.{g}": st for g, st in groups.items()}), meta

    def restore_checkpoint(self, saved: dict[str, State], meta: dict) -> None:
        """Inverse of ``checkpoint_state`` on the unpacked groups of a checkpoint."""
        self.restore({g[2:]: t for g, t in saved.items() if g.startswith("s.")}, meta)


class SharedLoRA(Strategy):
    """One LoRA per client; the tensors ``shared`` selects are averaged over all clients each
    round (weighted by sample count), the rest stay local; ``frozen`` tensors never train."""

    shared: Callable[[str], bool] = staticmethod(lambda key: False)
    frozen_keys: Callable[[str], bool] = staticmethod(lambda key: False)

    def setup(self, template):
        super().setup(template)
        self.global_ = select(template(Layout()), self.shared)

    def down(self, cid, r, final=False):
        return dict(self.global_)

    def frozen(self, key, r):
        return self.frozen_keys(key)

    def up(self, cid, r, new):
        return select(new, self.shared)

    def aggregate(self, r, ups):
        if ups and self.global_:
            ids = sorted(ups)
            self.global_ = self.combine([ups[i] for i in ids], [self.weights[i] for i in ids])

    def state(self):
        return {"global": self.global_}, {}

    def restore(self, groups, meta):
        self.global_ = restored(self.global_, groups, "global") if self.global_ else {}
