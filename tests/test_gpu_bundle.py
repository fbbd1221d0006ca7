"""benchmarks/gpu_bundle.py: what travels to a GPU machine fits one call and comes back intact."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import load_script
from safetensors.torch import load_file

from fedlease.models import model_path

bundle = load_script("benchmarks/gpu_bundle.py")


def tiny_glue(root):
    data = root / "glue"
    (data / "sst2").mkdir(parents=True)
    rows = [{"sentence": f"text {i}", "label": i % 2, "idx": i} for i in range(5)]
    for split in ("train", "validation"):
        (data / "sst2" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def tiny_flan(root):
    data = root / "flan"
    (data / "sst2").mkdir(parents=True)
    (data / "sst2" / "test.jsonl").write_text('{"inputs": "Is it good?", "targets": "yes"}\n')
    return data


def test_pack_then_unpack_restores_the_model_and_the_data(tmp_path):
    out = tmp_path / "bundle"
    assert bundle.pack(out, tiny_glue(tmp_path), tiny_flan(tmp_path)) == 0
    causal = out / "cache" / bundle.CAUSAL
    assert not (causal / bundle.WEIGHTS).exists() and (causal / "config.json").is_file()
    weights = out / "site" / bundle.PACKAGE / "model" / bundle.WEIGHTS
    assert weights.stat().st_size < 50 * 2**20  # float16 on the way
    assert bundle.unpack(out) == 0
    restored = load_file(weights)
    original = load_file(f"{model_path('minilm')}/{bundle.WEIGHTS}")
    assert restored.keys() == original.keys()
    for name, value in original.items():
        assert restored[name].dtype == value.dtype
        if value.is_floating_point():  # float16 rounding, no more
            torch.testing.assert_close(restored[name], value, rtol=1e-3, atol=1e-5)
    assert (out / "glue" / "sst2" / "train.jsonl").read_text().count("\n") == 5
    assert (out / "flan" / "sst2" / "test.jsonl").read_text().startswith('{"inputs"')
    env = dict(line.split(" ", 1)[1].split("=", 1) for line in (out / "env.sh").read_text().split(
        "\n") if line)  # fmt: skip
    assert env["FEDLEASE_CACHE"] == str(out / "cache") and env["PYTHONPATH"] == str(out / "site")
    random = load_file(causal / bundle.WEIGHTS)  # SmolLM2's shapes, weights drawn at random
    assert (causal / bundle.RANDOM).exists() and len(random) > 100
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in random.values())
    # ROUGE for the FLAN round comes from the bundle's site/ (the GPU image has no rouge_score)
    found = subprocess.run([sys.executable, "-c", "import rouge_score.rouge_scorer as r, nltk, "
                            "six; print(r.__file__, nltk.__file__, six.__file__)"],
                           env={**os.environ, "PYTHONPATH": str(out / "site")},
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert all(f.startswith(str(out / "site")) for f in found), found
    assert bundle.unpack(out) == 0  # a second unpack leaves the restored weights alone
    assert load_file(weights).keys() == original.keys()


def test_pack_refuses_a_folder_it_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(bundle.BadInput, match="not a bundle"):
        bundle.pack(mine, tiny_glue(tmp_path), tiny_flan(tmp_path))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
