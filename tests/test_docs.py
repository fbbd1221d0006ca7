"""docs/using-the-layer.md runs as written: its Python blocks, in order, as one script."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "using-the-layer.md"

pytest.importorskip("peft")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_recipes_run(tmp_path):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 6
    script = tmp_path / "recipes.py"
    script.write_text("\n".join(blocks))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for path in ("out/adapter", "out/expert0", "out/trainer/fedlease_adapter"):
        assert (tmp_path / path / "adapter_config.json").exists(), path
