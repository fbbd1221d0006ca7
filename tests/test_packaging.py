"""The source distribution carries what a build from it needs (``python -m build`` builds the
wheel from the sdist): every file of csrc/, headers and the CUDA source included, every module of
fedlease/ and kernels/, and the licence's text."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sdist_files(tmp: Path) -> set[str]:
    """Paths inside an sdist built from a copy of the source tree, relative to its top folder.
    Built with ``FEDLEASE_NO_EXT=1``, so that setuptools adds no compiled source of its own: what
    csrc/ it holds comes from MANIFEST.in alone."""
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    for folder in ("fedlease", "kernels", "csrc"):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))  # fmt: skip
    env = dict(os.environ, FEDLEASE_NO_EXT="1")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", "dist"], cwd=src, env=env,
                   check=True, capture_output=True)  # fmt: skip
    (archive,) = (src / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        return {Path(*Path(name).parts[1:]).as_posix() for name in tar.getnames()}


def test_the_sdist_carries_every_source_a_build_needs(tmp_path):
    files = sdist_files(tmp_path)
    csrc = [p for p in (ROOT / "csrc").iterdir() if p.is_file()]
    assert {p.suffix for p in csrc} >= {".cpp", ".h", ".cu"}
    modules = [*(ROOT / "fedlease").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
    wanted = {p.relative_to(ROOT).as_posix() for p in [*csrc, *modules]} | {"LICENSE"}
    assert not wanted - files, sorted(wanted - files)
