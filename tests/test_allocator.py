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
for _ in range(3):
    before = faults()
    ts = [torch.ones(1 << 20) for _ in range(16)]  # 16 x 4 MiB, every page written
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
    first, *again = page_faults("keep")
    _, *again_default = page_faults("default")
    assert first > 10_000  # 64 MiB of 4 KiB pages faulted in once
    assert sum(again) < first / 3  # the later rounds reuse them (16-25 % faulted again seen)
    assert sum(again_default) > 3 * sum(again)  # glibc's default handed them back
    from fedlease.allocator import ENV, keep_freed_memory

    monkeypatch.setenv(ENV, "0")
    assert keep_freed_memory() is False  # the opt-out
