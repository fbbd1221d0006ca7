"""A run's output directory is owned: the run lists every file it wrote there in a manifest, and a
later run into the same directory removes those files and nothing else.

The run writes its artefacts (``ARTEFACTS``) at the top of the directory and everything else in
its own folders (``FOLDERS``: checkpoint, adapters, a Flower run's client states). Before a fresh
run writes anything, ``problem`` says why the directory cannot take it: another run is there and
``overwrite`` was not given, or a file the run would write (or one inside its folders) was not
written by a fedlease run. So when the run starts, every file in those places is its own, and
``record`` (after each checkpoint and at the end) lists what is there: files another process adds
to a run's folders while it runs would be listed too; nothing else can be.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST = "fedlease-run.json"
ARTEFACTS = ("config.yaml", "metrics.jsonl", "clusters.json", "summary.json", "dendrogram.png",
             "distance_heatmap.png", "silhouette.png", "accuracy.png")  # fmt: skip
FOLDERS = ("checkpoint", "adapters", "client-states")


def listed(out: Path, manifest: str = MANIFEST) -> set[str]:
    """The files (relative to ``out``, ``/``-separated) an earlier run's manifest names; empty
    when there is none or it cannot be read (then nothing counts as a run's)."""
    try:
        files = json.loads((out / manifest).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    if not isinstance(files, list):
        return set()
    return {f for f in files if isinstance(f, str) and _inside(out, f)}


def _inside(out: Path, rel: str) -> bool:
    """A manifest entry that names a file inside ``out``, links followed (an edited manifest
    cannot reach anything else)."""
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        return False
    return (out / rel).resolve().is_relative_to(out.resolve())


def _places(out: Path) -> list[Path]:
    """Every file now in the places a run writes."""
    found = [out / name for name in ARTEFACTS if (out / name).exists()]
    for folder in FOLDERS:
        if (out / folder).exists():
            found += sorted(p for p in (out / folder).rglob("*") if not p.is_dir())
    return found


class OutputError(ValueError):
    """An output directory a run cannot take; the message names it and the file in the way."""


def make(out: Path) -> None:
    """Create ``out`` (and its parents); ``OutputError`` naming it where the system refuses."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"output {str(out)!r}: cannot create it ({exc.strerror})") from None


def problem(out: Path, overwrite: bool) -> str | None:
    """Why a fresh run cannot write into ``out`` (None: it can): a file; not empty and no
    ``overwrite``; or, with ``overwrite``, holding a file where the run writes that no run wrote."""
    if not out.exists():
        above = next(p for p in out.absolute().parents if p.exists())
        return None if above.is_dir() else f"output {str(out)!r}: {str(above)!r} is a file"
    if not out.is_dir():
        return f"output {str(out)!r} is a file, not a directory"
    if not any(out.iterdir()):
        return None
    if not overwrite:
        held = "an earlier run" if (out / MANIFEST).exists() else "files of its own"
        return (f"output {str(out)!r} is not empty (it holds {held}): pass --overwrite to write "
                "the run there (it replaces only the files an earlier run wrote), --resume to "
                "continue a run, or choose another directory")  # fmt: skip
    ours = listed(out)
    for path in _places(out):
        rel = path.relative_to(out).as_posix()
        if rel not in ours:
            return (f"output {str(out)!r} holds {rel!r}, which no fedlease run wrote and this run "
                    "would write over; move it or choose another directory")  # fmt: skip
    return None


def clear(out: Path) -> None:
    """Remove the files an earlier run's manifest names, the folders they leave empty and the
    manifest; nothing else."""
    for rel in sorted(listed(out)):
        path = out / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
    for folder in FOLDERS:
        if (out / folder).is_dir():
            for sub in sorted((out / folder).rglob("*"), key=lambda p: -len(p.parts)):
                if sub.is_dir() and not any(sub.iterdir()):
                    sub.rmdir()
            if not any((out / folder).iterdir()):
                (out / folder).rmdir()
    (out / MANIFEST).unlink(missing_ok=True)


def record(out: Path, files: list[str] | None = None, manifest: str = MANIFEST) -> None:
    """List ``files`` (default: every file now in the run's places) as written by fedlease, in
    ``manifest`` (written atomically)."""
    if files is None:
        files = [p.relative_to(out).as_posix() for p in _places(out)]
    tmp = out / (manifest + ".tmp")
    tmp.write_text(json.dumps({"files": sorted(files)}, indent=1) + "\n")
    os.replace(tmp, out / manifest)


def foreign(out: Path, names: tuple[str, ...], manifest: str) -> str | None:
    """The first of ``names`` in ``out`` that ``manifest`` does not list (a file of the user's
    that writing ``names`` would replace), or None."""
    ours = listed(out, manifest)
    return next((n for n in names if (out / n).exists() and n not in ours), None)
