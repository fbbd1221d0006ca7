"""FedLEASE end to end on real GLUE data (needs $FEDLEASE_DATA_DIR; CI sets it)."""

import json
import os

import pytest
import torch
import yaml

from fedlease.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("FEDLEASE_DATA_DIR"), reason="FEDLEASE_DATA_DIR not set"),
]

TINY = {
    "clients": ["sst2", "mrpc", "sst2", "mrpc"],
    "precision": "fp32",
    "train_samples": 64,
    "test_samples": 32,
    "warmup_rounds": 2,
    "rounds": 2,
    "local_epochs": 1,
    "max_seq_len": 64,
    "max_experts": 3,
    "seed": 0,
}
RANK, HIDDEN, LAYERS, TARGETS = 4, 384, 6, 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    (root / "c.yaml").write_text(yaml.safe_dump(TINY))
    assert (
        main(
            [
                "run",
                "--config",
                str(root / "c.yaml"),
                "--output",
                str(root / "out"),
                "--no-progress",
            ]
        )
        == 0
    )
    return root / "out"


def test_artefacts_written(tiny_run):
    for name in [
        "config.yaml",
        "metrics.jsonl",
        "clusters.json",
        "summary.json",
        "dendrogram.png",
        "distance_heatmap.png",
        "silhouette.png",
        "accuracy.png",
    ]:
        assert (tiny_run / name).stat().st_size > 0, name
    assert yaml.safe_load((tiny_run / "config.yaml").read_text())["clients"] == TINY["clients"]


def test_clustering_separates_the_tasks(tiny_run):
    clusters = json.loads((tiny_run / "clusters.json").read_text())
    a = clusters["assignment"]
    assert clusters["num_experts"] == 2 and a[0] == a[2] and a[1] == a[3] and a[0] != a[1]
    assert set(clusters["silhouette"]) == {"2", "3"}
    d = clusters["distance_matrix"]
    assert d[0][2] < d[0][1] and d[1][3] < d[1][2]


def test_summary_and_metrics(tiny_run):
    s = json.loads((tiny_run / "summary.json").read_text())
    assert s["method"] == "fedlease" and s["num_experts"] == 2
    assert set(s["final"]["per_task"]) == {"sst2", "mrpc"}
    assert len(s["final"]["per_client"]) == 4
    assert ["f1" in c for c in s["final"]["per_client"]] == [False, True, False, True]
    assert s["samples"] == {"train": [64] * 4, "test": [32] * 4}
    assert 0 <= s["final"]["mean"] <= 1
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["warmup", "warmup", "adaptive", "adaptive"]
    assert rows[-1]["mean_accuracy"] == pytest.approx(s["final"]["mean"])


def test_communication_counts_the_tensors_exchanged(tiny_run):
    """Bytes per adaptive round, recomputed from the shapes that travel (float32)."""
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    k, n, layers = 2, 4, LAYERS * TARGETS
    expert = layers * (RANK * HIDDEN + HIDDEN * RANK) * 4
    router = layers * (2 * k - 1) * HIDDEN * 4
    for r in rows[:2]:  # warm-up is local
        assert r["bytes_up"] == 0 and r["bytes_down"] == 0
    allocation_upload = n * expert  # every client's warm-up LoRA goes up once, before round 2
    for i, r in enumerate(rows[2:]):
        assert r["bytes_up"] == n * (expert + router) + (allocation_upload if i == 0 else 0)
        assert r["bytes_down"] == n * (k * expert + router)
    s = json.loads((tiny_run / "summary.json").read_text())
    assert s["comm_bytes"]["up"] == allocation_upload + 2 * n * (expert + router)


def test_warmup_aggregate_fedavgs_the_lora(tmp_path):
    """warmup_aggregate: true makes every client hold the same (averaged) LoRA after warm-up."""
    from fedlease.fl import checkpoint

    cfg = {"clients": ["sst2", "mrpc", "sst2"], "precision": "fp32", "train_samples": 16,
           "test_samples": 8,
           "warmup_rounds": 1, "rounds": 0, "local_epochs": 1, "max_seq_len": 32,
           "num_experts": 2, "warmup_aggregate": True}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["run", "--config", str(tmp_path / "c.yaml"), "--output", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    ckpt = checkpoint.load(out)
    groups = checkpoint.unpack(ckpt.tensors)
    lora = [k for k in groups["client0"] if k.endswith((".lora_A", ".lora_B"))]
    assert len(lora) == LAYERS * TARGETS * 2
    for k in lora:
        assert torch.equal(groups["client0"][k], groups["client1"][k])
        assert torch.equal(groups["client0"][k], groups["client2"][k])
    heads = [groups[f"client{i}"]["classifier.weight"] for i in range(3)]
    assert not torch.equal(heads[0], heads[1])  # heads stay local
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    lora_bytes = LAYERS * TARGETS * (RANK * HIDDEN + HIDDEN * RANK) * 4
    assert row["bytes_up"] == 3 * lora_bytes and row["bytes_down"] == 3 * lora_bytes


def test_final_adapters_are_saved_and_evaluate(tiny_run, capsys):
    """Each client's final state is saved as an adapter that `fedlease eval` loads strictly."""
    from safetensors.torch import load_file

    from fedlease.fl import checkpoint

    groups = checkpoint.unpack(checkpoint.load(tiny_run).tensors)
    assignment = json.loads((tiny_run / "summary.json").read_text())["assignment"]
    for i in range(4):
        adapter = tiny_run / "adapters" / f"client{i}"
        saved = load_file(str(adapter / "adapter_model.safetensors"))
        assert saved.keys() == groups[f"client{i}"].keys()
        assert all(torch.equal(saved[k], groups[f"client{i}"][k]) for k in saved)
        meta = json.loads((adapter / "adapter_config.json").read_text())
        assert meta["task"] == TINY["clients"][i] and meta["model"] == "minilm"
        assert meta["moe_lora"]["own_expert"] == assignment[i]
        assert meta["moe_lora"]["routing"] == "adaptive"
    capsys.readouterr()
    assert (
        main(["eval", "--adapter", str(tiny_run / "adapters" / "client1"), "--samples", "24"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("mrpc: accuracy ") and "f1 " in out and "(24 examples)" in out


def test_bad_adapter_files_are_named(tiny_run, tmp_path, capsys):
    """Truncated weights, shapes that do not fit, a broken config, no adapter: exit 2, named."""
    import shutil

    good = tiny_run / "adapters" / "client0"
    k = json.loads((tiny_run / "summary.json").read_text())["num_experts"]

    def copy(name):
        bad = tmp_path / name
        shutil.copytree(good, bad)
        return bad

    truncated = copy("truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    reshaped = copy("reshaped")
    meta = json.loads((reshaped / "adapter_config.json").read_text())
    meta["moe_lora"]["rank"] = 8
    (reshaped / "adapter_config.json").write_text(json.dumps(meta))
    broken = copy("broken")
    (broken / "adapter_config.json").write_text('{"moe_lora": {"rank": 4,')
    cases = {
        truncated: f"cannot read adapter weights {weights}",
        reshaped: f"lora_A has shape ({k}, 4, 384), its config says ({k}, 8, in)",  # before a model
        broken: "cannot read adapter config",
        tmp_path / "absent": "cannot read adapter config",
    }
    for path, message in cases.items():
        before = sorted(p.name for p in tmp_path.rglob("*"))
        assert main(["eval", "--adapter", str(path), "--samples", "4"]) == 2, path
        err = capsys.readouterr().err
        assert message in err, (path, err)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
