"""Run configuration and tensors in and out of Flower records."""

from __future__ import annotations

import contextlib
import json
import math
import typing
from dataclasses import dataclass

import yaml
from flwr.app import ArrayRecord, ConfigRecord

from ..fl.config import ConfigError, FLConfig, from_dict, load_yaml
from ..fl.types import State


@dataclass
class ServerOptions:
    """Flower-only settings, read from the run config next to the ``FLConfig`` keys."""

    output_dir: str = "runs/flower"
    round_timeout: float = 600.0  # seconds to wait for the replies of one round
    min_results: int = 0  # fewest train replies (rejected uploads count) to go on; 0: all
    node_timeout: float = 120.0  # seconds to wait for all clients' nodes to connect
    resume: bool = False  # continue from the checkpoint in output_dir (clients from their nodes')
    overwrite: bool = False  # a fresh run into a non-empty output_dir: replace an earlier run's


def parse_run_config(run_config: dict) -> tuple[FLConfig, ServerOptions]:
    """``FLConfig`` keys (``-`` or ``_``; strings hold YAML, e.g. ``clients = "[sst2, mrpc]"``,
    and ``""`` is null) plus the ``ServerOptions`` keys; validated like ``fedlease run`` configs."""
    hints = typing.get_type_hints(ServerOptions)
    opts, raw = ServerOptions(), {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name in hints:
            setattr(opts, name, _option(key, value, hints[name]))
        elif isinstance(value, str):
            try:
                raw[name] = load_yaml(value) if value != "" else None
            except yaml.YAMLError as exc:
                raise ConfigError(f"run config {key!r} = {value!r} is not valid YAML") from exc
        else:
            raw[name] = value
    for key in ("round_timeout", "node_timeout"):
        value = getattr(opts, key)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"run config {key.replace('_', '-')!r} = {value!r}: must be > 0")
    if not opts.output_dir:
        raise ConfigError("run config 'output-dir' is empty: name the run's directory")
    if opts.min_results < 0:
        raise ConfigError(f"run config 'min-results' = {opts.min_results!r}: must be >= 0")
    return from_dict(raw), opts


def _option(key: str, value, kind: type):
    """A ``ServerOptions`` value of type ``kind`` from the run config, or ``ConfigError`` naming
    the key."""
    parsed = _parse_option(value, kind)
    if parsed is None:
        raise ConfigError(f"run config {key!r} = {value!r}: must be {kind.__name__}")
    return parsed


def _parse_option(value, kind: type):
    """``value`` as ``kind`` (TOML gives the type; a string may spell it), None when it is not
    one. Not ``kind(value)``: ``bool("false")`` is True and ``int(1.5)`` is 1."""
    if isinstance(value, bool) or kind is bool:
        if isinstance(value, str):
            return {"true": True, "false": False}.get(value.lower())
        return value if isinstance(value, bool) and kind is bool else None
    if isinstance(value, str):
        if kind is str:
            return value
        with contextlib.suppress(ValueError):
            return kind(value)  # int("1.5") raises
        return None
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    return value if kind is int and isinstance(value, int) else None


def to_record(state: State) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().contiguous() for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    return dict(record.to_torch_state_dict())


def round_config(r: int, public: dict, **extra) -> ConfigRecord:
    return ConfigRecord({"round": r, "public": json.dumps(public), **extra})
