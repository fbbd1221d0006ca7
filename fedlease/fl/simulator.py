"""Federated runs in one process: the round driver over the in-process transport."""

from __future__ import annotations

from pathlib import Path

from .config import FLConfig
from .driver import RoundDriver, Summary
from .inprocess import InProcess


def simulation(
    cfg: FLConfig,
    output_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
) -> RoundDriver:
    """The driver of a run of ``cfg`` in this process (``run()`` executes it): with an output
    directory ``resume=True`` continues from the last complete round found there and gives the
    same result as an uninterrupted run (every client's randomness is seeded by run seed, round
    and client id). A fresh run refuses a directory that is not empty unless ``overwrite``, and
    then removes only what an earlier run wrote there (``fedlease.fl.rundir``)."""
    return RoundDriver(cfg, InProcess(cfg, progress), output_dir, resume, progress,
                       overwrite=overwrite)  # fmt: skip


def run(
    cfg: FLConfig,
    output_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
) -> Summary:
    """Run ``cfg.method`` as configured; write artefacts to ``output_dir`` when given."""
    return simulation(cfg, output_dir, progress, resume, overwrite).run()


__all__ = ["Summary", "run", "simulation"]
