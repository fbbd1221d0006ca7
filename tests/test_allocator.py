"""keep_freed_memory: later rounds of the same large allocations find their pages mapped."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from fedlease.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(4):
    before = faults()
    ts = [torch.ones(10 << 20) for _ in range(4)]  # 4 x 40 MiB, every page written
    counts.append(faults() - before)
    del ts
print(*counts)
"""


def page_faults(mode: str, **env) -> list[int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=dict(os.environ, **env),
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return [int(n) for n in out.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_stays_mapped_for_the_next_step(monkeypatch):
    """Blocks above 32 MiB, which glibc always maps and unmaps: kept, a later round reuses the
    pages (the best of three later rounds is counted: the kernel may reclaim some of a process's
    idle pages between rounds, as it did on a VM here), while glibc's defaults fault every page
    in again every round."""
    first, *again = page_faults("keep")
    _, *again_default = page_faults("default")
    assert first > 40_000  # 160 MiB of 4 KiB pages faulted in once
    assert min(again) < first / 8
    assert min(again_default) > first / 2
    from fedlease.allocator import ENV, keep_freed_memory

    monkeypatch.setenv(ENV, "0")
    assert keep_freed_memory() is False  # the opt-out
