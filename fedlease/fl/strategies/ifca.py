"""IFCA (Ghosh et al., NeurIPS 2020) with LoRA: K copies of the adapter on the server.

Every round each client receives all K copies, picks the one with the lowest loss on (up to
``PICK_EXAMPLES`` of) its training data, trains it and sends it back with its index; the server
averages copy k over the clients that picked it (weighted by sample count) and keeps a copy no
one picked. K = ``num_experts`` when it is a number, else ``max_experts``.

The copies must differ for the choice to mean anything: copy k starts from its own seeded A and
a small random B (std ``B_INIT_STD``) instead of LoRA's all-zero B, which would make all K copies
compute the same function and send every client to copy 0.

Sends down: K adapters. Sends up: one adapter and its index. Stays local: head.
"""

from __future__ import annotations

import torch

from ..robust import validate_upload
from .base import (
    Layout,
    State,
    Strategy,
    checked_choices,
    is_expert,
    merge,
    restored,
    select,
)

PICK_EXAMPLES = 256
B_INIT_STD = 1e-2


def _copy_key(k: int, key: str) -> str:
    return f"copy{k}:{key}"


def _split_copy_key(name: str) -> tuple[int, str] | None:
    """``"copy2:enc.q.lora_A"`` -> ``(2, "enc.q.lora_A")``; None for a plain tensor name."""
    prefix, sep, key = name.partition(":")
    if not (sep and prefix.startswith("copy")):
        return None
    return int(prefix[4:]), key


class IFCA(Strategy):
    name = "ifca"
    pick_examples = PICK_EXAMPLES

    def setup(self, template):
        super().setup(template)
        cfg = self.cfg
        self.k = cfg.num_experts if isinstance(cfg.num_experts, int) else cfg.max_experts
        base = select(template(Layout()), is_expert)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.copies = []
        for _ in range(self.k):
            copy = {}
            for key, v in base.items():
                if key.endswith(".lora_B"):
                    copy[key] = torch.randn(v.shape, generator=gen, dtype=v.dtype) * B_INIT_STD
                else:  # kaiming-uniform like the layer's own A init, one draw per copy
                    bound = 1.0 / v.shape[-1] ** 0.5
                    copy[key] = (torch.rand(v.shape, generator=gen, dtype=v.dtype) * 2 - 1) * bound
            self.copies.append(copy)
        self.choice = [0] * self.n
        self._picked: dict[int, int] = {}

    def down(self, cid, r, final=False):
        if final:  # the copy this client trained (its cluster), as plain tensors
            return dict(self.copies[self.choice[cid]])
        return {_copy_key(k, key): v for k, c in enumerate(self.copies) for key, v in c.items()}

    def candidates(self, cid, template, kept, received):
        copies: dict[int, dict] = {}
        for name, v in received.items():
            if (split := _split_copy_key(name)) is not None:
                copies.setdefault(split[0], {})[split[1]] = v
        if not copies:
            return None
        return [merge(template, kept, copies[k]) for k in sorted(copies)]

    def client_state(self, cid, template, kept, received, losses_of=None):
        states = self.candidates(cid, template, kept, received)
        if states is None:
            return merge(template, kept, received)
        if losses_of is None:
            raise ValueError("IFCA needs the client's loss to pick a copy")
        losses = losses_of(states, self.pick_examples)
        pick = min(range(len(losses)), key=losses.__getitem__)
        self._picked[cid] = pick
        return states[pick]

    def up(self, cid, r, new):
        pick = self._picked.pop(cid)
        return {_copy_key(pick, k): v for k, v in select(new, is_expert).items()}

    def aggregate(self, r, ups):
        by_copy: dict[int, list[int]] = {}
        plain: dict[int, State] = {}
        for cid, up in ups.items():
            split = {name: _split_copy_key(name) for name in up}
            pick = next(iter(split.values()))[0]
            self.choice[cid] = pick
            by_copy.setdefault(pick, []).append(cid)
            plain[cid] = {split[name][1]: v for name, v in up.items()}
        for k, members in by_copy.items():
            self.copies[k] = self.combine([plain[i] for i in members],
                                           [self.weights[i] for i in members])  # fmt: skip

    def check_upload(self, cid, r, upload):
        """Names carry the copy the client picked: one valid copy, its plain tensors as expected."""
        split = {name: _split_copy_key(name) for name in upload}
        picks = {s[0] for s in split.values() if s is not None}
        if None in split.values() or len(picks) != 1 or not 0 <= next(iter(picks)) < self.k:
            return f"wrong tensors: names {sorted(upload)[:3]} name no single copy 0..{self.k - 1}"
        plain = {split[name][1]: v for name, v in upload.items()}
        return validate_upload(select(self.template(self.layout(r)), is_expert), plain)

    def group_of(self, cid, r, upload):
        """The copy the upload names (checked by ``check_upload``)."""
        return _split_copy_key(next(iter(upload)))[0]

    @property
    def num_experts(self):
        return self.k

    def assignment(self):
        return list(self.choice)

    def state(self):
        return {f"copy{k}": c for k, c in enumerate(self.copies)}, {"choice": self.choice}

    def restore(self, groups, meta):
        self.copies = [restored(c, groups, f"copy{k}") for k, c in enumerate(self.copies)]
        self.choice = checked_choices(meta.get("choice"), self.n, self.k, "choice")
