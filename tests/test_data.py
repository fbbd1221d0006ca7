"""GLUE loading from a local directory and client partitioning."""

import json

import pytest

from fedlease.data import DataError, load_split, partition_indices


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_local_loading_and_errors(tmp_path):
    rows = [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(5)]
    write(tmp_path / "sst2" / "train.jsonl", rows)
    got = load_split("sst2", "train", tmp_path)
    assert got[3] == {"sentence": "s3", "label": 1}
    with pytest.raises(DataError, match="missing data file .*sst2/validation.jsonl"):
        load_split("sst2", "validation", tmp_path)
    write(tmp_path / "sst2" / "train.jsonl", [rows[0], "{not json"])
    with pytest.raises(DataError, match=r"train.jsonl:2: malformed JSON"):
        load_split("sst2", "train", tmp_path)
    write(tmp_path / "sst2" / "train.jsonl", [rows[0], {"label": 1}])
    with pytest.raises(DataError, match=r"train.jsonl:2: missing field 'sentence'"):
        load_split("sst2", "train", tmp_path)
    write(tmp_path / "sst2" / "train.jsonl", [rows[0], {"sentence": "x", "label": 7}])
    with pytest.raises(DataError, match=r"train.jsonl:2: unknown label 7"):
        load_split("sst2", "train", tmp_path)
    with pytest.raises(DataError, match="unknown task 'imdb'"):
        load_split("imdb", "train", tmp_path)


def test_partition_disjoint_deterministic_and_capped():
    labels = [i % 2 for i in range(100)]
    a = partition_indices(labels, 3, 20, seed=1, task="sst2", split="train")
    b = partition_indices(labels, 3, 20, seed=1, task="sst2", split="train")
    c = partition_indices(labels, 3, 20, seed=2, task="sst2", split="train")
    assert a == b and a != c
    flat = [i for part in a for i in part]
    assert len(flat) == 60 == len(set(flat))
    capped = partition_indices(labels, 3, 50, seed=1, task="rte", split="validation")
    assert [len(p) for p in capped] == [33, 33, 33]
    with pytest.raises(DataError, match="too few for 3 clients"):
        partition_indices([0, 1], 3, 5, seed=1, task="rte", split="validation")


def test_label_skew():
    labels = [i % 2 for i in range(2000)]
    parts = partition_indices(labels, 4, 200, 0, "sst2", "train", label_alpha=0.1)
    flat = [i for p in parts for i in p]
    assert all(len(p) == 200 for p in parts) and len(set(flat)) == 800
    fractions = [sum(labels[i] for i in p) / 200 for p in parts]
    assert max(abs(f - 0.5) for f in fractions) > 0.3  # strongly skewed at alpha 0.1


@pytest.mark.skipif(
    not __import__("os").environ.get("FEDLEASE_DATA_DIR"), reason="FEDLEASE_DATA_DIR not set"
)
def test_real_glue_files_load():
    for task, fields in [
        ("sst2", {"sentence"}),
        ("qnli", {"question", "sentence"}),
        ("mrpc", {"sentence1", "sentence2"}),
        ("rte", {"sentence1", "sentence2"}),
    ]:
        rows = load_split(task, "validation")
        assert len(rows) > 100 and set(rows[0]) == fields | {"label"}
        assert {r["label"] for r in rows} == {0, 1}
