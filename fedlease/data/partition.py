"""Split each task's data among its clients: disjoint, seeded, optionally label-skewed."""

from __future__ import annotations

import zlib

import numpy as np

from .glue import DataError


def _task_rng(seed: int, task: str, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{task}/{split}".encode())])


def samples_per_client(available: int, num_clients: int, wanted: int, task: str, split: str) -> int:
    """``wanted``, or an even split of what the task has when that is fewer."""
    got = min(wanted, available // num_clients)
    if got < 1:
        raise DataError(
            f"{task}/{split} has {available} examples, too few for {num_clients} clients"
        )
    return got


def partition_indices(
    labels: list[int],
    num_clients: int,
    per_client: int,
    seed: int,
    task: str,
    split: str,
    label_alpha: float | None = None,
    num_labels: int = 2,
) -> list[list[int]]:
    """Disjoint index lists, ``per_client`` each, for ``num_clients`` clients of one task.

    ``per_client`` is a cap: a task too small to give every client that many examples is split
    evenly instead (``len // num_clients`` each; see :func:`samples_per_client`).

    Without ``label_alpha`` each client gets a uniform random draw. With it, each client's label
    mix is drawn from Dirichlet(``label_alpha``) and filled from per-label pools (no overlap).
    """
    per_client = samples_per_client(len(labels), num_clients, per_client, task, split)
    rng = _task_rng(seed, task, split)
    if label_alpha is None:
        order = rng.permutation(len(labels))
        return [order[i * per_client : (i + 1) * per_client].tolist() for i in range(num_clients)]
    labels_arr = np.asarray(labels)
    pools = [rng.permutation(np.flatnonzero(labels_arr == c)).tolist() for c in range(num_labels)]
    out = []
    for _ in range(num_clients):
        props = rng.dirichlet([label_alpha] * num_labels)
        counts = np.floor(props * per_client).astype(int)
        counts[np.argmax(props)] += per_client - counts.sum()
        picked: list[int] = []
        for c in np.argsort(-props):  # most wanted label first; spill over when a pool runs dry
            take = min(int(counts[c]), len(pools[c]))
            picked += pools[c][:take]
            pools[c] = pools[c][take:]
            counts[c] -= take
        short = per_client - len(picked)
        for c in range(num_labels):
            take = min(short, len(pools[c]))
            picked += pools[c][:take]
            pools[c] = pools[c][take:]
            short -= take
        out.append(sorted(picked))
    return out
