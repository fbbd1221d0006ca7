"""The generation setting end to end on a tiny random Llama and the real FLAN files: every method
runs, metrics and summary report ROUGE, the allocation clusters the generation clients' B
matrices, a killed run resumes to the same result, a saved client adapter evaluates, and bad
input stops the run with exit 2 before anything is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import kill_after_rounds

from fedlease.cli import main

FLAN = os.environ.get("FEDLEASE_FLAN_DIR") or (
    str(p) if (p := Path(__file__).resolve().parents[2] / "shared" / "data" / "flan").is_dir()
    else None
)  # fmt: skip
pytestmark = [pytest.mark.slow, pytest.mark.skipif(FLAN is None, reason="no FLAN data copy")]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    """A 2-layer random Llama with MiniLM's (bundled, offline) tokenizer, saved as a local model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedlease.models import model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                      tie_word_embeddings=True)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def config(model: str, **over) -> dict:
    return {
        "task_type": "generation", "model": model, "data_dir": FLAN, "precision": "fp32",
        "clients": ["fix_punct", "sst2", "fix_punct", "sst2"],
        "train_samples": 16, "test_samples": 4, "warmup_rounds": 1, "rounds": 1,
        "local_epochs": 1, "batch_size": 8, "max_seq_len": 96, "max_new_tokens": 4,
        "max_experts": 2, "warmup_lr": 0.05, "lr": 0.01, "threads": 1, "seed": 0, **over,
    }  # fmt: skip


def write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "flan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fedlease_generation_run_reports_rouge_and_allocates(tiny_lm, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--config", str(write(tmp_path, config(tiny_lm))), "--output", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["metric"] for r in rows] == ["rouge1", "rouge1"]
    for c in rows[-1]["clients"]:
        assert {"rouge1", "rouge2", "rougeL", "eval_loss"} <= set(c)
        assert 0.0 <= c["rouge2"] <= 1.0 and np.isfinite(c["eval_loss"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["metric"] == "rouge1"
    assert summary["final"]["mean"] == pytest.approx(rows[-1]["mean_rouge1"])
    # the allocation read the generation clients' warm-up B (q_proj / v_proj of the Llama)
    clusters = json.loads((out / "clusters.json").read_text())
    d = np.asarray(clusters["distance_matrix"])
    assert d.shape == (4, 4) and np.allclose(d, d.T) and np.allclose(np.diag(d), 0, atol=1e-6)
    assert (d[~np.eye(4, dtype=bool)] > 0).all()
    assert summary["num_experts"] == clusters["num_experts"] == 2
    adapters = sorted(p.name for p in (out / "adapters" / "client0").iterdir())
    assert "adapter_model.safetensors" in adapters
    meta = json.loads((out / "adapters" / "client0" / "adapter_config.json").read_text())
    assert any("q_proj" in m for m in json.dumps(meta).split('"'))
    assert (out / "accuracy.png").is_file() and (out / "dendrogram.png").is_file()


def test_distances_separate_the_tasks_of_generation_clients(tiny_lm, tmp_path):
    """Two text-editing and two sentiment clients: after the warm-up each client's B is nearer to
    its task twin's than to either client of the other task (seeded; a real signal, not noise:
    the two tasks' prompts and answers differ completely)."""
    from fedlease.fl import b_distance_matrix, from_dict
    from fedlease.fl.simulator import simulation
    from fedlease.fl.strategies.base import is_expert, select

    cfg = from_dict(config(tiny_lm, rounds=0, warmup_rounds=1, train_samples=32))
    fed = simulation(cfg, None, progress=False)
    fed.run()
    d = b_distance_matrix([select(k, is_expert) for k in fed.transport.kept])
    assert d[0, 2] < min(d[0, 1], d[0, 3]) and d[1, 3] < min(d[1, 0], d[1, 2]), d


METHODS = ["fedit", "fedsa_lora", "feddpa", "local", "ifca", "ffa_lora", "fedlease_topk",
           "fedlease_fixed_k", "fedlease_random"]  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_generation_clients(tiny_lm, tmp_path, method):
    from fedlease.fl import from_dict, run

    warmup = 1 if method.startswith("fedlease") else 0
    summary = run(from_dict(config(tiny_lm, method=method, warmup_rounds=warmup, rounds=1,
                                   train_samples=8, test_samples=2)), progress=False)  # fmt: skip
    assert summary.final["metric"] == "rouge1"
    assert all(np.isfinite(c["rouge1"]) for c in summary.final["per_client"])


def test_generation_run_killed_then_resumed_matches_uninterrupted(tiny_lm, tmp_path):
    cfg = write(tmp_path, config(tiny_lm, rounds=2))
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    cmd = [sys.executable, "-m", "fedlease", "run", "--no-progress", "--config", str(cfg)]
    subprocess.run([*cmd, "--output", str(whole)], check=True, capture_output=True, timeout=600)
    # warm-up and first adaptive round done: killed inside the last
    kill_after_rounds([*cmd, "--output", str(broken)], broken, 2, poll_s=0.02)
    assert not (broken / "summary.json").exists(), "killed after the run had finished"
    assert main(["run", "--resume", str(broken), "--no-progress"]) == 0

    def result(run_dir):
        s = json.loads((run_dir / "summary.json").read_text())
        return s["final"], s["assignment"]

    assert result(broken) == result(whole)


def test_a_generation_client_adapter_evaluates(tiny_lm, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = config(tiny_lm, method="fedit", warmup_rounds=0, rounds=1, test_samples=3)
    assert main(["run", "--config", str(write(tmp_path, cfg)), "--output", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "adapters" / "client1"), "--data-dir", FLAN,
                 "--samples", "3"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.startswith("sst2: rouge1 ") and "(3 examples)" in printed
    # the client's own test examples are the run's (its partition), eval takes the split's first
    # three: the score is a ROUGE fraction either way
    score = float(printed.split()[2])
    assert 0.0 <= score <= 1.0


def _line(task: str, row: dict, tmp: Path) -> Path:
    root = tmp / "flan"
    for t in ("fix_punct", "sst2"):
        (root / t).mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            src = Path(FLAN) / t / f"{split}.jsonl"
            (root / t / f"{split}.jsonl").write_text("".join(src.read_text().splitlines(True)[:40]))
    bad = root / task / "train.jsonl"
    lines = bad.read_text().splitlines(True)
    lines[6] = json.dumps(row) + "\n"
    bad.write_text("".join(lines))
    return root


@pytest.mark.parametrize(
    "change, message",
    [
        ({"max_new_tokens": 0}, "'max_new_tokens' = 0: must be >= 1"),
        ({"clients": ["fix_punct", "nope", "sst2"]}, "unknown FLAN task 'nope'"),
        ({"task_type": "translation"}, "'task_type' = 'translation'"),
    ],
)
def test_bad_generation_config_exits_2_and_writes_nothing(tiny_lm, tmp_path, capsys, change,
                                                          message):  # fmt: skip
    out = tmp_path / "run"
    code = main(["run", "--config", str(write(tmp_path, {**config(tiny_lm), **change})),
                 "--output", str(out), "--no-progress"])  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("drop", ["instruction", "output"])
def test_a_flan_line_without_its_key_exits_2_naming_file_and_line(tiny_lm, tmp_path, capsys,
                                                                  drop):  # fmt: skip
    row = {"instruction": "Fix this", "input": "", "output": "Fixed."}
    del row[drop]
    root = _line("sst2", row, tmp_path)
    out = tmp_path / "run"
    code = main(["run", "--config", str(write(tmp_path, config(tiny_lm, data_dir=str(root)))),
                 "--output", str(out), "--no-progress"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert f"{root / 'sst2' / 'train.jsonl'}:7" in err and f"missing key {drop!r}" in err
    assert not out.exists()


def test_an_empty_flan_split_exits_2_naming_the_file(tiny_lm, tmp_path, capsys):
    root = _line("sst2", {"instruction": "x", "output": "y"}, tmp_path)
    (root / "fix_punct" / "test.jsonl").write_text("")
    out = tmp_path / "run"
    code = main(["run", "--config", str(write(tmp_path, config(tiny_lm, data_dir=str(root)))),
                 "--output", str(out), "--no-progress"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert str(root / "fix_punct" / "test.jsonl") in err and "no examples" in err
    assert not out.exists()


def test_compare_tabulates_rouge_for_generation_runs(tiny_lm, tmp_path):
    from fedlease.fl import from_dict
    from fedlease.fl.compare import compare

    cfg = from_dict(config(tiny_lm, warmup_rounds=1, rounds=1, train_samples=8, test_samples=2))
    result = compare(cfg, ["fedlease", "local"], [0], tmp_path / "cmp", progress=False)
    assert result["metric"] == "rouge1"
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.startswith("ROUGE-1 (%) on each client's held-out data")
    for method in ("fedlease", "local"):
        summary = json.loads((tmp_path / "cmp" / f"{method}-seed0" / "summary.json").read_text())
        assert result["methods"][method]["mean"] == pytest.approx(summary["final"]["mean"])
        assert f"| {method} |" in table


@pytest.mark.parametrize("method", ["fedlease", "fedit", "ifca"])
def test_generation_clients_train_the_same_in_lockstep(tiny_lm, method):
    """Causal-LM clients trained two at a time through one model (each its own next-token loss
    over its answer tokens) end where one-by-one training leaves them, and are evaluated two at a
    time (one teacher-forced forward and one greedy decoding per step, each sequence on its own
    client's adapters) to the same ROUGE and loss; the tiny Llama has no dropout, the adapters'
    is off."""
    from helpers import assert_same_run

    from fedlease.fl import from_dict
    from fedlease.fl.simulator import simulation

    cfg = config(tiny_lm, method=method, dropout=0.0, train_samples=12, test_samples=2)
    one = simulation(from_dict(cfg), progress=False)
    one.run()
    two = simulation(from_dict(cfg | {"client_batch": 2}), progress=False)
    assert two.run().client_batch == 2
    assert_same_run(one, two)


def test_lockstep_decoding_gives_each_client_its_own_answers(tiny_lm):
    """Three clients with very different adapters (random B), decoded together (uneven test
    sets, so one drops out of the last step): each gets the token ids its model alone decodes
    and the same reference-answer loss; another client's adapters would give other answers (so
    a row decoded on the wrong adapters would show)."""
    from fedlease.fl import from_dict
    from fedlease.fl.simulator import simulation
    from fedlease.fl.types import Layout
    from fedlease.generation.decode import greedy_generate_ids
    from fedlease.generation.score import evaluate_generation

    cfg = from_dict(config(tiny_lm, clients=["fix_punct", "sst2", "fix_punct"], test_samples=3,
                           eval_batch_size=4, max_new_tokens=6))  # fmt: skip
    transport = simulation(cfg, progress=False).transport
    transport.start()
    pool, layout = transport.pool, Layout()
    data = transport.data
    data[2].test.prompts.pop()  # client 2: two test prompts, the others three
    data[2].test.references.pop()
    for k in data[2].test.features:
        data[2].test.features[k].pop()
    data[2].test.labels.pop()
    torch.manual_seed(1)
    states = [{k: (torch.randn_like(v) if k.endswith("lora_B") else v.clone())
               for k, v in pool.template(layout).items()} for _ in data]  # fmt: skip
    trainer = pool.lockstep(layout, 3)
    answers, losses, tokens = trainer.generate_answers(data, states, [0, 0, 0])
    runner = pool.runner(layout)
    for c, state, got, loss, n in zip(data, states, answers, losses, tokens):
        runner._load(state, 0)
        alone = greedy_generate_ids(runner.model, c.test.prompts, 6, runner.decoding.pad_id,
                                    runner.decoding.eos_id, batch_size=4)  # fmt: skip
        assert got == alone
        eval_loss = evaluate_generation(runner.model, c.test, runner.decoding, 4)["eval_loss"]
        assert loss / n == pytest.approx(eval_loss, rel=1e-5)
    runner._load(states[1], 0)  # client 0's prompts on client 1's adapters: other answers
    other = greedy_generate_ids(runner.model, data[0].test.prompts, 6, runner.decoding.pad_id,
                                runner.decoding.eos_id, batch_size=4)  # fmt: skip
    assert other != answers[0]
