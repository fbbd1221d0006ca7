"""Crash-safe run state: written after every round, read back by ``fedlease run --resume``.

A checkpoint is a pair in ``<run>/checkpoint/``: ``state-<round>.safetensors`` (every tensor the
run needs) and ``state.json`` (round count, allocation, communication, metrics so far, and the
name of the tensor file). Each file is written to a temporary name, fsynced and renamed, the
tensors first: a crash at any point leaves the previous complete checkpoint readable. No pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

DIR = "checkpoint"
META = "state.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read; the message names the file."""


@dataclass
class Checkpoint:
    meta: dict
    tensors: dict[str, torch.Tensor]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save(run_dir: Path, rounds_done: int, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    ckpt = run_dir / DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    name = f"state-{rounds_done:04d}.safetensors"
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(ckpt / name, lambda p: save_file(flat, str(p)))
    full = {**meta, "rounds_done": rounds_done, "tensors": name}
    _atomic_write(ckpt / META, lambda p: p.write_text(json.dumps(full) + "\n"))
    for old in ckpt.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def load(run_dir: Path) -> Checkpoint:
    meta_path = run_dir / DIR / META
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"no checkpoint to resume in {str(run_dir)!r} ({meta_path})") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read checkpoint {meta_path}: {exc}") from exc
    tensor_path = run_dir / DIR / meta["tensors"]
    try:
        tensors = load_file(str(tensor_path))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read checkpoint tensors {tensor_path}: {exc}") from exc
    return Checkpoint(meta, tensors)


def pack(groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{"client0": {name: t}}`` -> ``{"client0/name": t}``."""
    return {f"{g}/{k}": v for g, state in groups.items() for k, v in state.items()}


def unpack(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        group, _, name = key.partition("/")
        out.setdefault(group, {})[name] = value
    return out


# -- a Flower client's own state, on its node: the server's checkpoint does not hold it ----------
def _round_of(path: Path) -> int:
    return int(path.name[1:].split("-")[0])


def save_client_state(folder: Path, round_idx: int, step: int, tensors: dict) -> None:
    """What a client keeps after round ``round_idx``'s training (``step`` 0) or evaluation (1),
    written atomically; of older files only the newest earlier round's are kept (what a resume
    from this round would need)."""
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    path = folder / f"r{round_idx:05d}-{step}.safetensors"
    _atomic_write(path, lambda p: save_file(flat, str(p)))
    rounds = {_round_of(f) for f in folder.glob("r*-*.safetensors")}
    earlier = [x for x in rounds if x < round_idx]
    keep = {round_idx, max(earlier)} if earlier else {round_idx}
    for f in folder.glob("r*-*.safetensors"):
        if _round_of(f) not in keep:
            f.unlink()


def load_client_state(folder: Path, before_round: int) -> dict[str, torch.Tensor] | None:
    """The newest state saved for a round before ``before_round``, or None."""
    files = sorted(f for f in folder.glob("r*-*.safetensors") if _round_of(f) < before_round)
    if not files:
        return None
    try:
        return load_file(str(files[-1]))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read client state {files[-1]}: {exc}") from exc
