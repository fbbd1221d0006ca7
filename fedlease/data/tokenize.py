"""Per-client tokenised datasets and dynamic-padding batches."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .glue import load_split, resolve_data_dir, task_spec

IGNORE_INDEX = -100  # label of a token the loss skips (torch's cross-entropy default)


@dataclass
class Encoded:
    """Tokenised examples: per-example token lists and labels, a class per example
    (classification) or a token list per example (generation: ``IGNORE_INDEX`` over the prompt).
    Generation examples also keep their prompt's tokens and the reference answer, for decoding
    and scoring."""

    features: dict[str, list[list[int]]]
    labels: list[int] | list[list[int]]
    prompts: list[list[int]] | None = None
    references: list[str] | None = None

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

    @property
    def typical_length(self) -> int:
        """The median token count of the client's training examples."""
        lengths = sorted(len(s) for s in self.train.features["input_ids"])
        return lengths[len(lengths) // 2] if lengths else 0


def collate(features: dict[str, list[list[int]]], labels: list[int], pad_id: int):
    """Pad every feature to the longest example of the batch (``input_ids`` with ``pad_id``,
    token labels with ``IGNORE_INDEX``)."""
    longest = max(len(s) for s in features["input_ids"])
    out = {}
    for key, seqs in features.items():
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([s + [fill] * (longest - len(s)) for s in seqs], dtype=torch.long)
    if labels and isinstance(labels[0], list):
        labels = [y + [IGNORE_INDEX] * (longest - len(y)) for y in labels]
    out["labels"] = torch.tensor(labels, dtype=torch.long)
    return out


def encode(rows: list[dict], fields: tuple[str, ...], tokenizer, max_len: int) -> Encoded:
    texts = [[r[f] for r in rows] for f in fields]
    enc = tokenizer(*texts, truncation=True, max_length=max_len)
    keep = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return Encoded({k: list(enc[k]) for k in keep}, [r["label"] for r in rows])


@dataclass(frozen=True)
class Source:
    """Where a task type's examples come from and how they become ``Encoded``: the data directory
    (given, else its environment variable), the split names (training, held-out), the loader, the
    labels the partition may skew, the encoder."""

    resolve: Callable[[str | os.PathLike | None], os.PathLike | None]
    splits: tuple[str, str]
    load: Callable[[str, str, str | os.PathLike | None], list[dict]]
    labels: Callable[[list[dict]], list[int]]
    num_labels: Callable[[str], int]
    encode: Callable[[list[dict], str, object, int], Encoded]


GLUE = Source(
    resolve_data_dir,
    ("train", "validation"),
    load_split,
    lambda rows: [r["label"] for r in rows],
    lambda task: task_spec(task).num_labels,
    lambda rows, task, tokenizer, max_len: encode(
        rows, task_spec(task).text_fields, tokenizer, max_len
    ),
)
