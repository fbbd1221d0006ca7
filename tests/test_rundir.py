"""The run directory is owned: a run lists what it writes, a later run removes exactly that, and
nothing it did not write is removed or written over (``fedlease.fl.rundir``)."""

import json
from pathlib import Path

import pytest
import torch

from fedlease.fl import checkpoint, rundir


def earlier_run(out: Path) -> list[str]:
    """A finished run's files (artefacts, checkpoint, adapters) and its manifest."""
    written = [
        "config.yaml",
        "summary.json",
        "accuracy.png",
        "checkpoint/state.json",
        "checkpoint/state-0002.safetensors",
        "adapters/client0/adapter_config.json",
    ]
    for rel in written:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(f"written by the run: {rel}")
    rundir.record(out)
    return written


def test_the_manifest_lists_every_file_the_run_wrote_and_nothing_else(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    written = earlier_run(tmp_path)
    assert sorted(rundir.listed(tmp_path)) == sorted(written)


def test_clear_removes_what_the_manifest_lists_and_keeps_everything_else(tmp_path):
    earlier_run(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "adapters" / "my_adapter").mkdir()
    (tmp_path / "adapters" / "my_adapter" / "w.bin").write_bytes(b"\x00\x01")
    rundir.clear(tmp_path)
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == ["adapters", "adapters/my_adapter", "adapters/my_adapter/w.bin", "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "entry", ["../victim.txt", "{abs}", "link/victim.txt", "adapters/../../victim.txt"]
)
def test_an_edited_manifest_cannot_reach_outside_the_directory(entry, tmp_path):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("keep me")
    (out / "link").symlink_to(tmp_path, target_is_directory=True)
    entry = entry.format(abs=victim)
    (out / rundir.MANIFEST).write_text(json.dumps({"files": [entry]}))
    assert rundir.listed(out) == set()
    rundir.clear(out)
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize(
    "manifest", ["not json", '{"files": "config.yaml"}', "[1, 2]", '{"files": [3]}']
)
def test_a_malformed_manifest_claims_nothing(manifest, tmp_path):
    (tmp_path / "config.yaml").write_text("mine")
    (tmp_path / rundir.MANIFEST).write_text(manifest)
    assert rundir.listed(tmp_path) == set()
    assert "'config.yaml', which no fedlease run wrote" in rundir.problem(tmp_path, True)


def test_which_directories_a_fresh_run_takes(tmp_path):
    assert rundir.problem(tmp_path / "new", False) is None
    assert rundir.problem(tmp_path, False) is None  # empty
    (tmp_path / "f").write_text("x")
    assert "is a file" in rundir.problem(tmp_path / "f", False)
    assert "not empty (it holds files of its own): pass --overwrite" in rundir.problem(
        tmp_path, False
    )
    assert rundir.problem(tmp_path, True) is None  # nothing of the user's where the run writes
    run = tmp_path / "run"
    run.mkdir()
    earlier_run(run)
    assert "not empty (it holds an earlier run)" in rundir.problem(run, False)
    assert rundir.problem(run, True) is None
    (run / "adapters" / "client0" / "mine.txt").write_text("added later")
    assert "holds 'adapters/client0/mine.txt', which no fedlease run wrote" in rundir.problem(
        run, True
    )


def test_a_checkpoint_removes_only_the_files_its_predecessor_named(tmp_path):
    t = {"w": torch.randn(3)}
    (tmp_path / checkpoint.DIR).mkdir()
    theirs = tmp_path / checkpoint.DIR / "state-0001.safetensors.bak"
    mine = tmp_path / checkpoint.DIR / "mine.safetensors"
    for f in (theirs, mine):
        f.write_bytes(b"a user's file")
    checkpoint.save(tmp_path, 1, {}, t, {"client0": t})
    checkpoint.save(tmp_path, 2, {}, t, {"client0": t})
    names = sorted(p.name for p in (tmp_path / checkpoint.DIR).iterdir())
    kept = ["mine.safetensors", "state-0001.safetensors.bak"]
    assert names == sorted(
        [*kept, "client0-0002.safetensors", "state-0002.safetensors", "state.json"]
    )
    assert mine.read_bytes() == theirs.read_bytes() == b"a user's file"
