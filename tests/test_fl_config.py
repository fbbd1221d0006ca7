"""Config validation and the CLI on bad input: one message naming key and value, exit 2."""

import pytest
import torch
import yaml

from fedlease.cli import main
from fedlease.fl import ConfigError, from_dict, load_config

BASE = {"clients": ["sst2", "sst2", "qnli", "qnli"]}


def test_defaults_follow_the_paper():
    cfg = from_dict(BASE)
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.lr, cfg.weight_decay) == (4, 16, 0.05, 3e-3, 0.05)
    assert (cfg.local_epochs, cfg.warmup_rounds, cfg.rounds, cfg.max_experts) == (2, 5, 20, 4)
    assert (cfg.train_samples, cfg.test_samples) == (1000, 200)
    assert cfg.target_modules == ["query", "value"] and cfg.num_experts == "auto"
    assert cfg.warmup_aggregate is False
    # not from the paper: the warm-up B matrices that the allocation compares (allocation.md)
    assert (cfg.warmup_optimizer, cfg.warmup_lr) == ("sgd", 0.005)
    assert cfg.warmup_class_balanced is True and cfg.warmup_dropout is False


@pytest.mark.parametrize(
    "override, pattern",
    [
        ({"learning_rate": 0.1}, "unknown config key 'learning_rate'"),
        ({"rank": "four"}, "'rank' must be int, got 'four'"),
        ({"rank": 0}, "'rank' = 0"),
        ({"rounds": 2.5}, "'rounds' must be int, got 2.5"),
        ({"clients": ["sst2", "imdb", "qnli"]}, "unknown task 'imdb'"),
        ({"num_experts": 5}, "'num_experts' = 5"),
        ({"max_experts": 9}, "'max_experts' = 9: more experts than clients"),
        ({"num_experts": "many"}, "'num_experts' = 'many'"),
        ({"dropout": 1.0}, "'dropout' = 1.0"),
        ({"lr": -1}, "'lr' = -1"),
        ({"lr": float("nan")}, "'lr' must be a finite number, got nan"),
        ({"lr": "fast"}, "'lr' must be a finite number, got 'fast'"),
        ({"lr": "3e-3e"}, "'lr' must be a finite number, got '3e-3e'"),
        ({"rank": "4e0"}, "'rank' must be int, got '4e0'"),
        ({"dropout": float("inf")}, "'dropout' must be a finite number"),
        ({"method": "fedprox"}, "'method' = 'fedprox'"),
        ({"label_alpha": 0}, "'label_alpha' = 0"),
        ({"clients": ["sst2"]}, "'clients'"),
        ({"faults": {"crash_rate": 0.1}}, "unknown config key 'faults.crash_rate'"),
        ({"faults": {"client_failure_rate": 1.5}}, "'faults.client_failure_rate' = 1.5"),
        ({"faults": {"seed": "x"}}, "'faults.seed' must be int, got 'x'"),
        ({"faults": "often"}, "'faults' must be"),
        ({"warmup_rounds": 0}, "'warmup_rounds' = 0: method 'fedlease' clusters"),
        ({"top_k": 0}, "'top_k' = 0"),
        ({"warmup_optimizer": "adam"}, "'warmup_optimizer' = 'adam': must be one of"),
        ({"warmup_lr": 0}, "'warmup_lr' = 0.0: must be > 0"),
        ({"device": "gpu"}, "'device' = 'gpu': must be auto, cpu, cuda or cuda:N"),
        ({"device": "cuda:x"}, "'device' = 'cuda:x'"),
        ({"precision": "fp16"}, "'precision' = 'fp16': must be one of auto, fp32, bf16"),
    ],
)
def test_bad_values_name_key_and_value(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(BASE | override)


def test_exponent_numbers_that_yaml_reads_as_strings_are_numbers():
    """PyYAML reads ``lr: 3e-3`` (no dot) as the string '3e-3'; a key that takes a number reads it
    as the number. The command line's ``--set lr=3e-3`` goes through the same YAML."""
    cfg = from_dict(BASE | yaml.safe_load("lr: 3e-3\nwarmup_lr: 5E-3\nmax_norm_ratio: 1e1"))
    assert cfg.lr == 0.003 and cfg.warmup_lr == 0.005 and cfg.max_norm_ratio == 10.0
    assert isinstance(cfg.lr, float)


def test_overrides_are_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(path, ["rounds=3", "clients=[rte, rte, mrpc]", "label_alpha=0.5"])
    assert cfg.rounds == 3 and cfg.clients == ["rte", "rte", "mrpc"] and cfg.label_alpha == 0.5
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["rounds"])


@pytest.mark.parametrize(
    "extra, args, pattern",
    [
        ({"rank": 0}, [], "'rank' = 0"),
        ({"colour": "blue"}, [], "unknown config key 'colour'"),
        ({}, ["--set", "num_experts=7"], "'num_experts' = 7"),
        ({}, ["--data-dir", "/no/such/dir"], "'/no/such/dir' does not exist"),
        ({}, ["--set", "precision=half"], "'precision' = 'half'"),
        pytest.param(
            {},
            ["--set", "device=cuda"],
            "config key 'device': 'cuda': no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU"),
        ),
        ({}, ["--set", "device=cuda:99"], "config key 'device': 'cuda:99'"),
    ],
)
def test_cli_bad_input_exits_2_before_work(tmp_path, capsys, extra, args, pattern):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(BASE | extra))
    out = tmp_path / "out"
    code = main(["run", "--config", str(cfg), "--output", str(out), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert pattern in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_missing_config_file(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--config", "--output", "--data-dir", "--set", "--no-progress"):
        assert flag in text
    # every config key that --set takes is explained, with its default
    from fedlease.fl.config import KEY_HELP, FLConfig

    assert set(KEY_HELP) == set(FLConfig.__dataclass_fields__)
    assert all(len(text) > 10 for text in KEY_HELP.values())
    keys = text[text.index("config keys") :]
    for key in KEY_HELP:
        assert f"\n  {key} [" in keys or key == "clients", key
    assert "  precision [auto]: auto (bf16 where" in keys and "  threads [null]:" in keys


@pytest.mark.parametrize(
    "line, pattern",
    [
        ("{not json", r"train.jsonl:3: malformed JSON"),
        ('{"sentence": "fine"}', r"train.jsonl:3: missing field 'label'"),
        ('{"sentence": "odd", "label": 5}', r"train.jsonl:3: unknown label 5"),
    ],
)
def test_cli_bad_data_file_exits_2_and_writes_nothing(tmp_path, capsys, line, pattern):
    import json
    import re

    data = tmp_path / "data"
    for task in ("sst2", "rte"):
        (data / task).mkdir(parents=True)
        fields = {"sst2": ["sentence"], "rte": ["sentence1", "sentence2"]}[task]
        rows = [json.dumps({f: f"text {i}" for f in fields} | {"label": i % 2}) for i in range(8)]
        for split in ("train", "validation"):
            (data / task / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    good = (data / "sst2" / "train.jsonl").read_text().splitlines()
    (data / "sst2" / "train.jsonl").write_text("\n".join([*good[:2], line, *good[2:]]) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"clients": ["sst2", "sst2", "rte"], "train_samples": 2,
                                   "test_samples": 2}))  # fmt: skip
    out = tmp_path / "out"
    assert main(["run", "--config", str(cfg), "--output", str(out), "--data-dir", str(data),
                 "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert re.search(pattern, err) and err.count("\n") == 1
    assert not out.exists()
