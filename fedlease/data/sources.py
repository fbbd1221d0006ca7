"""Where each task type's data come from, and every client's share of it: GLUE for
classification, FLAN instruction tasks for generation."""

from __future__ import annotations

import os
import warnings

from .flan import FLAN
from .partition import partition_indices, samples_per_client
from .tokenize import GLUE, ClientData, Source


def source_for(task_type: str) -> Source:
    """``classification``: GLUE; ``generation``: FLAN instruction tasks."""
    return FLAN if task_type == "generation" else GLUE


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
    task_type: str = "classification",
) -> list[ClientData]:
    """One ``ClientData`` per entry of ``clients`` (a task name each), disjoint within a task;
    GLUE tasks for ``classification``, FLAN tasks (``<dir>/<task>/{train,test}.jsonl``) for
    ``generation``.

    ``only``: build just that client's task (the other entries are None); its data is the same
    as in a full build, since a task's partition depends only on the clients of that task.
    """
    source = source_for(task_type)
    out: list[ClientData | None] = [None] * len(clients)
    for task in dict.fromkeys(clients):
        if only is not None and task != clients[only]:
            continue
        ids = [i for i, t in enumerate(clients) if t == task]
        parts = {}
        for split, per_client in zip(source.splits, (train_samples, test_samples)):
            rows = source.load(task, split, data_dir)
            got = samples_per_client(len(rows), len(ids), per_client, task, split)
            if got < per_client:
                warnings.warn(
                    f"{task}/{split} has {len(rows)} examples for {len(ids)} clients: "
                    f"{got} per client instead of {per_client}",
                    stacklevel=2,
                )
            idx = partition_indices(source.labels(rows), len(ids), per_client, seed, task, split,
                                    label_alpha, source.num_labels(task))  # fmt: skip
            parts[split] = [
                source.encode([rows[j] for j in part], task, tokenizer, max_seq_len) for part in idx
            ]
        train, test = source.splits
        for k, cid in enumerate(ids):
            out[cid] = ClientData(cid, task, parts[train][k], parts[test][k])
    return out  # type: ignore[return-value]
