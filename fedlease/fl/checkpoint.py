"""Crash-safe run state: written after every round, read back by ``fedlease run --resume``.

A checkpoint in ``<run>/checkpoint/``: ``state-<round>.safetensors`` (the server's tensors),
one ``<group>-<round>.safetensors`` per separately stored group (each client's kept state) and
``state.json`` (round count, allocation, communication, metrics so far, and the names of the tensor
files). A group that did not change since the previous checkpoint keeps its file, so a round in
which 50 of 1,000 clients train writes 50 client files, not 1,000. Each file is written to a
temporary name, fsynced and renamed, the tensors first and ``state.json`` last, and the files the
previous ``state.json`` named that the new one does not are removed only after it (no other file
is): a crash at any point leaves the previous complete checkpoint readable. No pickle.
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


def save(
    run_dir: Path,
    rounds_done: int,
    meta: dict,
    tensors: dict[str, torch.Tensor],
    groups: dict[str, dict[str, torch.Tensor]] | None = None,
    unchanged: set[str] = frozenset(),
) -> None:
    """Write a checkpoint: ``tensors`` in one file; each of ``groups`` in its own file, except
    those in ``unchanged`` whose file from the previous checkpoint is still there."""
    ckpt = run_dir / DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    previous, previous_named = _named(ckpt)
    files = {}
    for group, state in (groups or {}).items():
        if group in unchanged and group in previous and (ckpt / previous[group]).exists():
            files[group] = previous[group]
            continue
        files[group] = f"{group}-{rounds_done:04d}.safetensors"
        flat_group = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        _atomic_write(ckpt / files[group], lambda p, t=flat_group: save_file(t, str(p)))
    name = f"state-{rounds_done:04d}.safetensors"
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(ckpt / name, lambda p: save_file(flat, str(p)))
    full = {**meta, "rounds_done": rounds_done, "tensors": name, "files": files}
    _atomic_write(ckpt / META, lambda p: p.write_text(json.dumps(full) + "\n"))
    named = {name, *files.values()}
    for old in previous_named - named:  # only files a checkpoint wrote, never another's
        (ckpt / old).unlink(missing_ok=True)


def _named(ckpt: Path) -> tuple[dict[str, str], set[str]]:
    """The previous checkpoint's group files and every tensor file it names (bare file names)."""
    try:
        meta = json.loads((ckpt / META).read_text())
        files = {str(g): Path(str(f)).name for g, f in dict(meta.get("files", {})).items()}
        named = {*files.values(), Path(str(meta.get("tensors", ""))).name} - {""}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}, set()
    return files, {n for n in named if n.endswith(".safetensors")}


def load(run_dir: Path) -> Checkpoint:
    meta_path = run_dir / DIR / META
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"no checkpoint to resume in {str(run_dir)!r} ({meta_path})") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read checkpoint {meta_path}: {exc}") from exc
    tensors = {}
    for group, name in _tensor_files(meta, meta_path):
        path = run_dir / DIR / name
        try:
            part = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"cannot read checkpoint tensors {path}: {exc}") from exc
        tensors |= part if group is None else {f"{group}/{k}": v for k, v in part.items()}
    return Checkpoint(meta, tensors)


def _tensor_files(meta, meta_path: Path) -> list[tuple[str | None, str]]:
    """(group, file name) of every tensor file ``meta`` names (None: the server's), each a bare
    ``.safetensors`` name in the checkpoint's folder, else ``CheckpointError``."""
    files = meta.get("files", {}) if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not isinstance(meta.get("tensors"), str):
        raise CheckpointError(f"{meta_path}: names no tensor files; the checkpoint cannot be read")
    named = [(None, meta["tensors"]), *files.items()]
    for group, name in named:
        if (
            not isinstance(name, str)
            or Path(name).name != name
            or not name.endswith(".safetensors")
        ):
            owner = group or "the server"
            raise CheckpointError(f"{meta_path}: tensor file {name!r} of {owner} is not a "
                                  ".safetensors file in the checkpoint's folder")  # fmt: skip
    return named


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
