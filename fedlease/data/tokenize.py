"""Per-client tokenised datasets and dynamic-padding batches."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from .glue import load_split, task_spec
from .partition import partition_indices, samples_per_client


@dataclass
class Encoded:
    """Tokenised examples: per-example token lists and labels."""

    features: dict[str, list[list[int]]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(
            {k: [v[i] for i in idx] for k, v in self.features.items()},
            [self.labels[i] for i in idx],
            pad_id,
        )


@dataclass
class ClientData:
    client_id: int
    task: str
    train: Encoded
    test: Encoded


def collate(features: dict[str, list[list[int]]], labels: list[int], pad_id: int):
    """Pad every feature to the longest example of the batch (``input_ids`` with ``pad_id``)."""
    longest = max(len(s) for s in features["input_ids"])
    out = {}
    for key, seqs in features.items():
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([s + [fill] * (longest - len(s)) for s in seqs], dtype=torch.long)
    out["labels"] = torch.tensor(labels, dtype=torch.long)
    return out


def encode(rows: list[dict], fields: tuple[str, ...], tokenizer, max_len: int) -> Encoded:
    texts = [[r[f] for r in rows] for f in fields]
    enc = tokenizer(*texts, truncation=True, max_length=max_len)
    keep = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return Encoded({k: list(enc[k]) for k in keep}, [r["label"] for r in rows])


def build_client_data(
    clients: list[str],
    tokenizer,
    train_samples: int,
    test_samples: int,
    max_seq_len: int,
    seed: int,
    label_alpha: float | None = None,
    data_dir: str | os.PathLike | None = None,
    only: int | None = None,
) -> list[ClientData]:
    """One ``ClientData`` per entry of ``clients`` (a task name each), disjoint within a task.

    ``only``: build just that client's task (the other entries are None); its data is the same
    as in a full build, since a task's partition depends only on the clients of that task.
    """
    out: list[ClientData | None] = [None] * len(clients)
    for task in dict.fromkeys(clients):
        if only is not None and task != clients[only]:
            continue
        spec = task_spec(task)
        ids = [i for i, t in enumerate(clients) if t == task]
        parts = {}
        for split, per_client in (("train", train_samples), ("validation", test_samples)):
            rows = load_split(task, split, data_dir)
            got = samples_per_client(len(rows), len(ids), per_client, task, split)
            if got < per_client:
                warnings.warn(
                    f"{task}/{split} has {len(rows)} examples for {len(ids)} clients: "
                    f"{got} per client instead of {per_client}",
                    stacklevel=2,
                )
            labels = [r["label"] for r in rows]
            idx = partition_indices(
                labels, len(ids), per_client, seed, task, split, label_alpha, spec.num_labels
            )
            parts[split] = [
                encode([rows[j] for j in part], spec.text_fields, tokenizer, max_seq_len)
                for part in idx
            ]
        for k, cid in enumerate(ids):
            out[cid] = ClientData(cid, task, parts["train"][k], parts["validation"][k])
    return out  # type: ignore[return-value]
