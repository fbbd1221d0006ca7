"""``fedlease --version``: the installed version (pyproject.toml's, its one definition) and what
the package runs on, each line derived from the same functions a run uses."""

import re
import sys
from pathlib import Path

import pytest
import torch

import fedlease
from fedlease.cli import main
from fedlease.ops.dispatch import BACKEND_NAMES, resolve_backend, unavailable_reason
from fedlease.precision import resolve_precision
from fedlease.version import dist_version

ROOT = Path(__file__).resolve().parents[1]


def version_report(capsys) -> list[str]:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    return capsys.readouterr().out.splitlines()


def test_the_version_is_pyprojects():
    project = (ROOT / "pyproject.toml").read_text().split("[project]\n", 1)[1]
    assert fedlease.__version__ == re.search(r'^version = "(.+)"$', project, re.M).group(1)
    # not installed (a source tree on sys.path): a stand-in that version parsers still accept
    assert dist_version("no-such-distribution", missing="0+unknown") == "0+unknown"


def test_version_names_versions_backends_and_precision(capsys, monkeypatch):
    monkeypatch.delenv("FEDLEASE_BACKEND", raising=False)
    lines = version_report(capsys)
    cpu = torch.device("cpu")
    python = ".".join(map(str, sys.version_info[:3]))
    assert lines[0].startswith(f"fedlease {fedlease.__version__} (Python {python}, torch "
                               f"{torch.__version__}, triton ")  # fmt: skip
    assert lines[1].startswith(f"cpu: {torch.get_num_threads()} threads; precision auto picks "
                               f"{resolve_precision('auto', cpu)} (")  # fmt: skip
    usable = [n for n in BACKEND_NAMES if unavailable_reason(n, cpu) is None]
    auto = resolve_backend("auto", cpu).name
    assert lines[2] == f"  backends {', '.join(usable)}; auto picks {auto}"
    for name in set(BACKEND_NAMES) - set(usable):
        assert f"  {name} unavailable: {unavailable_reason(name, cpu)}" in lines
    assert any(line.startswith("cuda: ") for line in lines)


def test_version_with_a_bad_backend_override_still_reports(capsys, monkeypatch):
    monkeypatch.setenv("FEDLEASE_BACKEND", "magic")
    lines = version_report(capsys)
    assert "auto picks none: unknown backend 'magic' (from $FEDLEASE_BACKEND)" in lines[2]
    monkeypatch.setenv("FEDLEASE_BACKEND", "torch")
    assert version_report(capsys)[2].endswith("auto picks torch ($FEDLEASE_BACKEND overrides it)")


def test_version_on_a_machine_with_a_gpu_names_it_and_its_backends(capsys, monkeypatch):
    """The CUDA lines, on this machine by a stand-in for torch.cuda (a GPU of compute capability
    9.0: bf16 is fast there)."""
    monkeypatch.delenv("FEDLEASE_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    lines = version_report(capsys)
    at = lines.index("cuda: Stand-in GPU (torch built for CUDA 13.0); precision auto picks bf16")
    cuda = torch.device("cuda")
    usable = [n for n in BACKEND_NAMES if unavailable_reason(n, cuda) is None]
    auto = resolve_backend("auto", cuda).name
    assert lines[at + 1] == f"  backends {', '.join(usable)}; auto picks {auto}"
