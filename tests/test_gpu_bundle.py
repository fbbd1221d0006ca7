"""benchmarks/gpu_bundle.py: what travels to a GPU machine fits one call and comes back intact."""

import json

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
    (data / "sst2" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_pack_then_unpack_restores_the_model_and_the_data(tmp_path):
    data = tiny_glue(tmp_path)
    out = tmp_path / "bundle"
    assert bundle.pack(out, data) == 0
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
    assert bundle.unpack(out) == 0  # a second unpack leaves the restored weights alone
    assert load_file(weights).keys() == original.keys()


def test_pack_refuses_a_folder_it_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(bundle.BadInput, match="not a bundle"):
        bundle.pack(mine, tiny_glue(tmp_path))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
