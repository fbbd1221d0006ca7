"""Command-line pieces shared by the scripts beside the package (``benchmarks/``, ``studies/``),
so that a bad value ends as it does in ``fedlease``'s own commands: one line naming it and exit
status 2, never a traceback.

- ``at_least(lo[, most])``, ``int_list(lo)``, ``float_list``, ``name_list(choices)``,
  ``existing_device``, ``output_file``: argparse types, so argparse itself refuses
  ``--steps 0``, ``--clients 4,x`` or a ``--json`` that cannot be written before any run.
- ``exit_on_user_error(prog)``: a ``with`` block in which fedlease's errors about the user's
  input (a missing data directory, a bad ``--set``, a config the run would refuse) and a
  script's own ``BadInput`` end the process with that one line.
- ``read_json(path)``: a JSON file a user names, or ``BadInput`` saying why not.
- ``check_config(cfg)``: what ``fedlease run`` checks before it starts, for benchmarks that
  build their configs in code.
- ``child_result(argv, what)``: the JSON line of a measurement run in its own process; the
  child's bad-input line ends this process too.
- ``until_interrupted(items, measure)``: measurements one after another, keeping those that
  finished when Ctrl-C stops the rest (the scripts then report them and exit with 130).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


class BadInput(ValueError):
    """A script's own finding that its input is wrong (``exit_on_user_error`` reports it)."""


def at_least(lo: int, most: int | None = None):
    """An argparse type: an integer >= ``lo`` (and <= ``most`` when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be <= {most}, got {value}")
        return value

    return parse


def int_list(lo: int):
    """An argparse type: one or more comma-separated integers, each >= ``lo``."""

    def parse(text: str) -> list[int]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expects comma-separated integers, got {text!r}")
        return [at_least(lo)(item) for item in items]

    return parse


def float_list(text: str) -> list[float]:
    """An argparse type: one or more comma-separated finite numbers."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        values = [float(item) for item in items]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expects comma-separated numbers, got {text!r}")
    return values


def share(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def name_list(choices: tuple[str, ...] | None):
    """An argparse type: one or more comma-separated names, each one of ``choices`` (any name
    when None)."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"expects one or more comma-separated names, got "
                                             f"{text!r}")  # fmt: skip
        for name in names:
            if choices is not None and name not in choices:
                raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(choices)}")
        return names

    return parse


def existing_device(text: str) -> str:
    """An argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` that this machine has."""
    from .precision import resolve_device

    try:
        resolve_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def output_file(text: str) -> Path:
    """An argparse type: a file path this process can write (its folder is created when needed),
    checked before a long run rather than at its end."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written ({str(existing)!r} is not "
                                         "a writable directory)")  # fmt: skip
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    return path


def read_json(path: str | Path):
    """The JSON document in ``path``; ``BadInput`` naming the file when it is missing, unreadable
    or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise BadInput(f"cannot read {str(path)!r}: {why}") from None
    except json.JSONDecodeError as exc:
        raise BadInput(f"{str(path)!r} is not JSON: {exc}") from None


@contextlib.contextmanager
def exit_on_user_error(prog: str):
    """Inside: fedlease's bad-input errors (``fedlease.errors.user_errors``) and ``BadInput``
    print ``PROG: error: ...`` and exit with status 2."""
    from .errors import user_errors

    try:
        yield
    except (*user_errors(), BadInput) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def check_config(cfg, device: bool = True):
    """Refuse now what a run of ``cfg`` would refuse later: a missing data directory and (with
    ``device``) a device or op backend this machine lacks (``DataError`` / ``ConfigError``).
    Returns ``cfg``."""
    from .data.sources import source_for
    from .fl.config import runtime

    source_for(cfg.task_type).resolve(cfg.data_dir)
    if device:
        runtime(cfg)
    return cfg


def child_result(argv: list[str], what: str) -> dict:
    """Run ``argv`` (a benchmark measuring in its own process) and return the JSON object on its
    last line of output. Bad input (exit status 2): its one line, then the same exit here; any
    other failure: exit 1 with the end of its stderr, naming ``what`` failed."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode == EXIT_BAD_INPUT:
        print((done.stderr.strip().splitlines() or [f"{what}: bad input"])[-1], file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if done.returncode != 0:
        sys.exit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def until_interrupted(items, measure) -> tuple[list, bool]:
    """``[measure(item) for item in items]`` until Ctrl-C: (the results of the items that
    finished, whether it was interrupted), so that a long benchmark still reports them."""
    results = []
    try:
        for item in items:
            results.append(measure(item))
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(results)} of {len(items)} finished", file=sys.stderr)
        return results, True
    return results, False
