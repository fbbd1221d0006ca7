"""A checkpoint's ``state.json`` checked as a whole before a resumed run does any work.

A resume trusts nothing in it: the round count must be one the run's config can reach, the metrics
must hold one well-formed row per round done (that round's number, one entry per client), the
communication counts and times must be non-negative numbers, the untrained scores one per client.
The tensor files it names are checked when they are read (``checkpoint.load``) and every tensor
against the shapes the run expects (``strategies.base.restored``); the strategy's own entries by
the strategy (``Strategy.restore``).
"""

from __future__ import annotations

import math

from .checkpoint import CheckpointError


def _bad(where: str, entry: str, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: {entry} {why}; the checkpoint cannot be resumed")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_meta(meta, where: str, clients: int, total_rounds: int) -> None:
    """Raise ``CheckpointError`` naming the first entry of ``meta`` (read from ``where``) that a
    run of ``clients`` clients and ``total_rounds`` rounds cannot have written."""
    if not isinstance(meta, dict):
        raise _bad(where, "the file", f"holds a {type(meta).__name__}, not an object")
    done = meta.get("rounds_done")
    if not _count(done) or done > total_rounds:
        raise _bad(where, "rounds_done", f"= {done!r} is not a round count in 0..{total_rounds}")
    comm = meta.get("comm")
    if not isinstance(comm, dict) or not all(_count(comm.get(k)) for k in ("up", "down")):
        raise _bad(where, "comm", f"= {comm!r} is not two byte counts 'up' and 'down'")
    if not _number(meta.get("elapsed_s")) or meta["elapsed_s"] < 0:
        raise _bad(where, "elapsed_s", f"= {meta.get('elapsed_s')!r} is not a duration")
    if not isinstance(meta.get("strategy"), dict):
        raise _bad(where, "strategy", "is missing or not an object")
    _check_untrained(meta, where, clients)
    _check_rows(meta.get("metrics"), where, clients, done)


def _check_untrained(meta: dict, where: str, clients: int) -> None:
    untrained = meta.get("untrained")
    if untrained is None and _number(meta.get("initial_mean")):  # older in-process checkpoints
        return
    if not isinstance(untrained, list) or len(untrained) != clients:
        raise _bad(where, "untrained", f"is not a list of {clients} scores (one per client)")
    if not all(_number(x) for x in untrained):
        raise _bad(where, "untrained", "holds an entry that is not a finite number")


def _check_rows(rows, where: str, clients: int, done: int) -> None:
    if not isinstance(rows, list) or len(rows) != done:
        n = len(rows) if isinstance(rows, list) else "no"
        raise _bad(where, "metrics", f"holds {n} rows for {done} rounds done")
    for r, row in enumerate(rows):
        if not isinstance(row, dict) or row.get("round") != r:
            raise _bad(where, f"metrics row {r}", f"is not the row of round {r}")
        per_client = row.get("clients")
        if not isinstance(per_client, list) or len(per_client) != clients:
            raise _bad(where, f"metrics row {r}", f"does not hold {clients} clients' entries")
        metric, evaluated = row.get("metric"), row.get("evaluated")
        if not isinstance(metric, str) or not isinstance(evaluated, bool):
            raise _bad(where, f"metrics row {r}", "names no metric or whether it was evaluated")
        for c, entry in enumerate(per_client):
            if not isinstance(entry, dict) or entry.get("client") != c:
                raise _bad(where, f"metrics row {r}", f"entry {c} is not client {c}'s")
            score = entry.get(metric)  # NaN: an evaluation that never arrived (Flower)
            if evaluated and (not isinstance(score, (int, float)) or isinstance(score, bool)):
                raise _bad(where, f"metrics row {r}", f"client {c}'s {metric} is not a number")
