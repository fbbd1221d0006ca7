"""Bad input, from a careless or hostile user: every case ends with exit code 2 and one line that
names the culprit, never a traceback, and leaves the run directory and a user's file beside it
exactly as they were (listing and bytes)."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import strict_json
from safetensors.torch import load_file, save_file

from fedlease.cli import main

DATA = os.environ.get("FEDLEASE_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA, reason="FEDLEASE_DATA_DIR not set")
TINY = {"clients": ["sst2", "mrpc", "sst2"], "precision": "fp32", "train_samples": 8,
        "test_samples": 8, "warmup_rounds": 1, "rounds": 1, "local_epochs": 1, "batch_size": 8,
        "max_seq_len": 24, "max_experts": 2, "threads": 1, "seed": 3}  # fmt: skip

TINY_YAML = yaml.safe_dump(TINY)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` by relative path, with the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run (checkpoint, adapters) to resume, evaluate and export."""
    root = tmp_path_factory.mktemp("finished")
    if not DATA:
        pytest.skip("FEDLEASE_DATA_DIR not set")
    (root / "c.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["run", "--config", str(root / "c.yaml"), "--output", str(root / "run"),
                 "--data-dir", DATA, "--no-progress"]) == 0  # fmt: skip
    return root / "run"


def write(path: Path, text: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def config(tmp: Path, **over) -> str:
    return write(tmp / "c.yaml", yaml.safe_dump(TINY | over))


def nan_adapter(finished: Path, tmp: Path) -> str:
    """A copy of client 0's adapter with one tensor poisoned."""
    copy = tmp / "nan_adapter"
    shutil.copytree(finished / "adapters" / "client0", copy)
    state = load_file(copy / "adapter_model.safetensors")
    name = next(k for k in state if k.endswith("lora_B"))
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(copy / "adapter_model.safetensors"))
    return str(copy)


def edited_adapter(finished: Path, tmp: Path, **change) -> str:
    """A copy of client 0's adapter whose adapter_config.json says otherwise: a key the run saved
    beside the MoE-LoRA config (``num_labels``, ``model``, ``max_seq_len``, ...), or a
    ``moe_lora`` key (``rank``, ``num_experts``, ``target_modules``)."""
    copy = tmp / "edited_adapter"
    shutil.copytree(finished / "adapters" / "client0", copy)
    meta = json.loads((copy / "adapter_config.json").read_text())
    for key, value in change.items():
        (meta if key in meta else meta["moe_lora"])[key] = value
    (copy / "adapter_config.json").write_text(json.dumps(meta))
    return str(copy)


def adapter_with(finished: Path, tmp: Path, name: str, data: bytes) -> str:
    """A copy of client 0's adapter with file ``name`` replaced by ``data``."""
    copy = tmp / f"adapter_{name}"
    shutil.copytree(finished / "adapters" / "client0", copy)
    (copy / name).write_bytes(data)
    return str(copy)


def resume_edited(finished: Path, o: str, change: str) -> list[str]:
    """``--resume`` of a copy of the finished run (in ``o``) whose state.json got ``change``."""
    shutil.copytree(finished, o, dirs_exist_ok=True)
    path = Path(o) / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    _edit(state, change)
    path.write_text(json.dumps(state))
    return ["run", "--resume", o, "--no-progress"]


def cmp(t: Path, o: str, *flags: str) -> list[str]:
    return ["compare", "--config", config(t), "--output", o, *flags]


def bomb() -> str:
    lines = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(12):
        prev = "a" if i == 0 else f"k{i - 1}"
        lines.append(f"k{i}: &k{i} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\nclients: *k11\n"


def run_with(t: Path, o: str, *extra: str, **over) -> list[str]:
    """``fedlease run`` of the tiny config (with ``over``) into ``o`` (which holds a user's file:
    ``--overwrite``), plus ``extra`` flags."""
    return ["run", "--config", config(t, **over), "--output", o, "--overwrite", *extra]


def holding(o: str, rel: str) -> str:
    """``o`` with a user's file at ``rel``, where a run would write."""
    write(Path(o) / rel, "a user's file where the run writes")
    return o


def run_file(t: Path, o: str, text: str | bytes) -> list[str]:
    """``fedlease run`` of a config file holding ``text``."""
    return ["run", "--config", write(t / "c.yaml", text), "--output", o]


def export(f: Path, out: str) -> list[str]:
    return ["export", "--adapter", str(f / "adapters" / "client0"), "--expert", "0", "--out", out]


def _edit(state: dict, change: str) -> None:
    """One corruption of a finished run's ``state.json`` (2 rounds, 3 clients, FedLEASE)."""
    if change == "rounds beyond the config":
        state["rounds_done"] = 5
    elif change == "a metrics row missing":
        state["metrics"].pop()
    elif change == "a client's entry missing":
        state["metrics"][1]["clients"].pop()
    elif change == "a score that is text":
        state["metrics"][1]["clients"][0]["accuracy"] = "high"
    elif change == "negative bytes":
        state["comm"]["up"] = -1
    elif change == "untrained of 2 clients":
        state["untrained"] = state["untrained"][:2]
    elif change == "tensor file outside":
        state["tensors"] = "../../secret.safetensors"
    elif change == "config a list":
        state["config"] = [1, 2]
    elif change == "expert out of range":
        state["strategy"]["allocation"]["assignment"][0] = 7
    elif change == "not an object":
        state.clear()
        state["x"] = None


STATE_CASES = {
    "rounds beyond the config": "rounds_done = 5 is not a round count in 0..2",
    "a metrics row missing": "metrics holds 1 rows for 2 rounds done",
    "a client's entry missing": "metrics row 1 does not hold 3 clients' entries",
    "a score that is text": "metrics row 1 client 0's accuracy is not a number",
    "negative bytes": "comm = {'up': -1",
    "untrained of 2 clients": "untrained is not a list of 3 scores",
    "tensor file outside": "tensor file '../../secret.safetensors' of the server",
    "config a list": "its config is not an object",
    "expert out of range": "allocation assignment = [7, ",
    "not an object": "names no tensor files",
}


COMPARE_SEED = ["--methods", "fedit", "--seeds", str(2**70)]
INTO = "write over what it reads"
# (name, argv from (tmp dir, run directory under test, finished run), what the message names)
CASES = [
    ("seed beyond 64 bits", lambda t, o, f: run_with(t, o, "--set", f"seed={2**70}"), "'seed'"),
    ("negative seed", lambda t, o, f: run_with(t, o, "--set", "seed=-1"), "'seed'"),
    ("config not UTF-8", lambda t, o, f: run_file(t, o, b"clients: \xff"), "not UTF-8"),
    (
        "duplicate key",
        lambda t, o, f: run_file(t, o, "clients: [sst2]\nrank: 4\nrank: 8\n"),
        "duplicate key 'rank' (line 3",
    ),
    ("alias bomb", lambda t, o, f: run_file(t, o, bomb()), "more than 64 aliases"),
    ("huge config", lambda t, o, f: run_file(t, o, "x: 1\n" * 300_000), "larger than"),
    (
        "config missing",
        lambda t, o, f: ["run", "--config", str(t / "no.yaml"), "--output", o],
        "cannot read config file",
    ),
    ("bad YAML in --set", lambda t, o, f: run_with(t, o, "--set", "lr=["), "not valid YAML"),
    (
        "huge unknown key",
        lambda t, o, f: run_with(t, o, "--set", "x" * 5000 + "=1"),
        "unknown config key 'xxx",
    ),
    ("client_batch 0", lambda t, o, f: run_with(t, o, "--set", "client_batch=0"), "'client_batch'"),
    ("output is a file", lambda t, o, f: run_with(t, write(t / "afile", "x")), "is a file"),
    (
        "output below a file",
        lambda t, o, f: run_with(t, write(t / "afile", "x") + "/run"),
        "afile' is a file",
    ),
    (
        "output the system refuses",
        lambda t, o, f: run_with(t, "/proc/fedlease-run"),
        "'/proc/fedlease-run': cannot create it",
    ),
    (
        "the causal LM as a classifier",
        lambda t, o, f: run_with(t, o, "--set", "model=smollm2"),
        "'smollm2' is the bundled causal LM, for task_type generation",
    ),
    (
        "threads beyond any CPU",
        lambda t, o, f: run_with(t, o, "--set", "threads=100000"),
        "'threads' = 100000: must be in 1..1,024",
    ),
    (
        "output not empty",
        lambda t, o, f: ["run", "--config", config(t), "--output", o],
        "is not empty (it holds files of its own): pass --overwrite",
    ),
    (
        "output holds a user's config.yaml",
        lambda t, o, f: run_with(t, holding(o, "config.yaml")),
        "holds 'config.yaml', which no fedlease run wrote",
    ),
    (
        "output holds a user's adapter",
        lambda t, o, f: run_with(t, holding(o, "adapters/mine/adapter_model.safetensors")),
        "holds 'adapters/mine/adapter_model.safetensors', which no fedlease run wrote",
    ),
    (
        "overwrite with resume",
        lambda t, o, f: ["run", "--resume", str(f), "--overwrite"],
        "--overwrite with --resume",
    ),
    (
        "resume to another output",
        lambda t, o, f: ["run", "--resume", str(f), "--output", o],
        "leave --output out",
    ),
    (
        "model path missing",
        lambda t, o, f: run_with(t, o, model="/no/such/model"),
        "no such directory",
    ),
    (
        "max_seq_len beyond the model",
        lambda t, o, f: run_with(t, o, max_seq_len=600),
        "'max_seq_len' = 600: model 'minilm' has 512 positions",
    ),
    (
        "two million clients",
        lambda t, o, f: run_with(t, o, clients={"sst2": 2_000_000}),
        "2000000 clients, more than 1,000,000",
    ),
    (
        "adapters beyond any machine's memory",
        lambda t, o, f: run_with(t, o, clients={"sst2": 500_000}, rank=384),
        "the clients' adapters need about",
    ),
    (
        "rank beyond the layers",
        lambda t, o, f: run_with(t, o, rank=1000),
        "'rank' = 1000: larger than the smallest adapted layer of model 'minilm' (384)",
    ),
    (
        "target module not linear",
        lambda t, o, f: run_with(t, o, target_modules=["attention"]),
        "is a BertAttention, not a linear layer",
    ),
    (
        "target module missing",
        lambda t, o, f: run_with(t, o, target_modules=["query", "nope"]),
        "'nope' matches no module of model 'minilm'",
    ),
    (
        "data not UTF-8",
        lambda t, o, f: run_with(t, o, "--data-dir", _bad_data(t)),
        "train.jsonl:2: not UTF-8",
    ),
    (
        "compare seed beyond 64 bits",
        lambda t, o, f: ["compare", "--config", config(t), "--output", o, *COMPARE_SEED],
        "'seed'",
    ),
    ("eval NaN adapter", lambda t, o, f: ["eval", "--adapter", nan_adapter(f, t)], "NaN or Inf"),
    (
        "export NaN adapter",
        lambda t, o, f: ["export", "--adapter", nan_adapter(f, t), "--expert", "0", "--out", o],
        "NaN or Inf",
    ),
    (
        "eval adapter config rank 10**9",
        lambda t, o, f: ["eval", "--adapter", edited_adapter(f, t, rank=10**9)],
        "its config says (2, 1000000000, in)",
    ),
    (
        "export adapter config with 10**12 labels",
        lambda t, o, f: [
            *export(f, o)[:2],
            edited_adapter(f, t, num_labels=10**12),
            *export(f, o)[3:],
        ],
        "num_labels = 1000000000000, but its head has 2 rows",
    ),
    (
        "eval on a task with more labels than the head",
        lambda t, o, f: ["eval", "--adapter", str(f / "adapters" / "client0"), "--task", "mnli"],
        "task 'mnli' has 3 labels, the adapter's head",
    ),
    ("export onto its input", lambda t, o, f: export(f, str(f / "adapters" / "client0")), INTO),
    (
        "export below a file",
        lambda t, o, f: export(f, write(t / "afile", "x") + "/peft"),
        "afile/peft': cannot write there (Not a directory)",
    ),
    # more of run's config: types, ranges, names
    ("rank a word", lambda t, o, f: run_with(t, o, rank="four"), "'rank'"),
    ("lr negative", lambda t, o, f: run_with(t, o, lr=-0.1), "'lr'"),
    ("lr NaN", lambda t, o, f: run_with(t, o, "--set", "lr=.nan"), "'lr'"),
    ("dropout 1.5", lambda t, o, f: run_with(t, o, dropout=1.5), "'dropout'"),
    ("batch_size 0", lambda t, o, f: run_with(t, o, batch_size=0), "'batch_size'"),
    ("local_epochs 0", lambda t, o, f: run_with(t, o, local_epochs=0), "'local_epochs'"),
    ("unknown method", lambda t, o, f: run_with(t, o, method="fedmagic"), "'method'"),
    ("unknown task", lambda t, o, f: run_with(t, o, clients=["sst2", "imdb"]), "'imdb'"),
    ("one client", lambda t, o, f: run_with(t, o, clients=["sst2"]), "'clients'"),
    ("clients a number", lambda t, o, f: run_with(t, o, clients=3), "'clients'"),
    ("zero clients of a task", lambda t, o, f: run_with(t, o, clients={"sst2": 0}), "'clients'"),
    ("precision fp8", lambda t, o, f: run_with(t, o, precision="fp8"), "'precision'"),
    ("backend unknown", lambda t, o, f: run_with(t, o, backend="magic"), "'backend'"),
    ("device tpu", lambda t, o, f: run_with(t, o, device="tpu"), "'device'"),
    ("num_experts above clients", lambda t, o, f: run_with(t, o, num_experts=9), "'num_experts'"),
    ("task_type unknown", lambda t, o, f: run_with(t, o, task_type="vision"), "'task_type'"),
    ("config a list", lambda t, o, f: run_file(t, o, "- clients\n- rank\n"), "mapping"),
    ("config empty", lambda t, o, f: run_file(t, o, ""), "'clients' is required"),
    ("--set without =", lambda t, o, f: run_with(t, o, "--set", "rank"), "key=value"),
    ("data dir missing", lambda t, o, f: run_with(t, o, "--data-dir", str(t / "nodata")), "nodata"),
    (
        "data dir a file",
        lambda t, o, f: run_with(t, o, "--data-dir", write(t / "data.txt", "x")),
        "data.txt' is not a directory",
    ),
    ("no config", lambda t, o, f: ["run", "--output", o], "give --config"),
    # resume
    (
        "resume without checkpoint",
        lambda t, o, f: [
            "run",
            "--resume",
            str(Path(write(Path(o) / "config.yaml", TINY_YAML)).parent),
        ],
        "no checkpoint to resume",
    ),
    (
        "resume of a missing directory",
        lambda t, o, f: ["run", "--resume", str(t / "gone")],
        "cannot read config file",
    ),
    *[
        (f"resume: {change}", lambda t, o, f, c=change: resume_edited(f, o, c), message)
        for change, message in STATE_CASES.items()
    ],
    # compare
    ("compare unknown method", lambda t, o, f: cmp(t, o, "--methods", "fedit,magic"), "'magic'"),
    ("compare repeated method", lambda t, o, f: cmp(t, o, "--methods", "fedit,fedit"), "repeat"),
    (
        "compare repeated seed",
        lambda t, o, f: cmp(t, o, "--methods", "fedit", "--seeds", "1,2,1"),
        "--seeds repeat: 1,2,1",
    ),
    ("compare no method", lambda t, o, f: cmp(t, o, "--methods", " , "), "at least one method"),
    (
        "compare without rounds",
        lambda t, o, f: cmp(t, o, "--methods", "fedit", "--set", "rounds=0"),
        "'rounds' = 0",
    ),
    (
        "compare, its second seed bad: no run starts",
        lambda t, o, f: cmp(t, o, "--methods", "fedit", "--seeds", "1,-2"),
        "--seeds: must be >= 0, got -2",
    ),
    (
        "fixed K above the clients (max_experts by default)",
        lambda t, o, f: run_file(
            t,
            o,
            yaml.safe_dump(
                {k: v for k, v in TINY.items() if k != "max_experts"}
                | {"method": "fedlease_fixed_k"}
            ),
        ),
        "method 'fedlease_fixed_k' makes max_experts experts, more than the clients (3)",
    ),
    (
        "compare seeds not numbers",
        lambda t, o, f: cmp(t, o, "--methods", "fedit", "--seeds", "a,b"),
        "--seeds",
    ),
    (
        "compare onto a user's compare.md",
        lambda t, o, f: cmp(t, holding(o, "compare.md"), "--methods", "fedit"),
        "holds 'compare.md', which no comparison wrote",
    ),
    (
        "compare no seeds",
        lambda t, o, f: cmp(t, o, "--methods", "fedit", "--seeds", ","),
        "--seeds",
    ),
    # eval and export
    (
        "eval adapter missing",
        lambda t, o, f: ["eval", "--adapter", str(t / "none")],
        "cannot read adapter config",
    ),
    (
        "eval --samples 0",
        lambda t, o, f: ["eval", "--adapter", str(f / "adapters" / "client0"), "--samples", "0"],
        "--samples",
    ),
    (
        "eval unknown task",
        lambda t, o, f: ["eval", "--adapter", str(f / "adapters" / "client0"), "--task", "imdb"],
        "imdb",
    ),
    (
        "eval adapter config not JSON",
        lambda t, o, f: ["eval", "--adapter", adapter_with(f, t, "adapter_config.json", b"{")],
        "cannot read adapter config",
    ),
    (
        "eval adapter config not an object",
        lambda t, o, f: ["eval", "--adapter", adapter_with(f, t, "adapter_config.json", b"[1]")],
        "must hold a JSON object",
    ),
    (
        "eval adapter weights empty",
        lambda t, o, f: ["eval", "--adapter", adapter_with(f, t, "adapter_model.safetensors", b"")],
        "cannot read adapter weights",
    ),
    (
        "eval adapter weights a huge header length",
        lambda t, o, f: [
            "eval",
            "--adapter",
            adapter_with(f, t, "adapter_model.safetensors", b"\xff" * 8 + b"{}"),
        ],
        "cannot read adapter weights",
    ),
    (
        "eval adapter config with 0 experts",
        lambda t, o, f: ["eval", "--adapter", edited_adapter(f, t, num_experts=0)],
        "bad 'moe_lora' entry",
    ),
    (
        "export expert out of range",
        lambda t, o, f: [*export(f, o)[:4], "7", *export(f, o)[5:]],
        "--expert 7 is out of range",
    ),
    (
        "export expert negative",
        lambda t, o, f: [*export(f, o)[:4], "-1", *export(f, o)[5:]],
        "--expert -1 is out of range",
    ),
    (
        "export adapter missing",
        lambda t, o, f: ["export", "--adapter", str(t / "none"), "--expert", "0", "--out", o],
        "cannot read adapter config",
    ),
    (
        "export into a user's folder",
        lambda t, o, f: export(f, holding(o, "README.md")),
        "already holds 'README.md', which the export would write over",
    ),
    ("export onto a file", lambda t, o, f: export(f, write(t / "x.bin", "x")), "is a file"),
    (
        "eval adapter config max_seq_len a word",
        lambda t, o, f: ["eval", "--adapter", edited_adapter(f, t, max_seq_len="long")],
        "'max_seq_len' must be an integer >= 1, got 'long'",
    ),
    (
        "export adapter config model a number",
        lambda t, o, f: [*export(f, o)[:2], edited_adapter(f, t, model=5), *export(f, o)[3:]],
        "'model' must be a string, got 5",
    ),
    (
        "eval adapter config targets a missing module",
        lambda t, o, f: ["eval", "--adapter", edited_adapter(f, t, target_modules=["nope"])],
        "'nope' matches no module of BertForSequenceClassification",
    ),
    (
        "export adapter config targets a missing module",
        lambda t, o, f: [
            *export(f, o)[:2],
            edited_adapter(f, t, target_modules=["nope"]),
            *export(f, o)[3:],
        ],
        "'nope' matches no module of BertForSequenceClassification",
    ),
    (
        "export into its input",
        lambda t, o, f: export(f, str(f / "adapters" / "client0" / "x")),
        INTO,
    ),
]


def _bad_data(tmp: Path) -> str:
    """A GLUE copy whose SST-2 training file has a byte that is not UTF-8 on line 2."""
    root = tmp / "glue"
    shutil.copytree(DATA, root)
    path = root / "sst2" / "train.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(
        lines[0] + b'{"sentence": "caf\xe9", "label": 1, "idx": 9}\n' + b"".join(lines[2:])
    )
    return str(root)


@needs_data
@pytest.mark.parametrize("name, argv, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_naming_it_and_touches_nothing(name, argv, pattern, finished, tmp_path,
                                                         capsys):  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    write(out / "my_notes.txt", "a user's own file")  # must survive every case
    neighbour = tmp_path / "neighbour.txt"
    write(neighbour, "beside the run")
    args = argv(tmp_path, str(out), finished)
    before = (snapshot(out), snapshot(finished), neighbour.read_bytes())
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, (name, err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
    assert pattern in err, err
    assert (snapshot(out), snapshot(finished), neighbour.read_bytes()) == before


@needs_data
@pytest.mark.parametrize("change", [["--set", "seed=4"], ["--set", "lr=0.01"], "edit"])
def test_a_resume_with_another_config_is_refused_naming_the_keys(change, finished, tmp_path,
                                                                 capsys):  # fmt: skip
    """--set on the command line, or an edited config.yaml in the run directory: the checkpoint's
    recorded config decides, and nothing is written."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    args = ["run", "--resume", str(run), "--no-progress"]
    key = "lr"
    if change == "edit":
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["rank"] = 8
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        key = "rank"
    else:
        args += change
        key = change[1].split("=")[0]
    before = snapshot(run)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot resume {str(run)!r} with another config ({key}:" in err, err
    assert snapshot(run) == before


@needs_data
def test_a_resume_may_change_threads_and_the_data_directory(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["config"]["seed"] == TINY["seed"]  # the checkpoint records the run's config
    assert main(["run", "--resume", str(run), "--no-progress", "--set", "threads=2",
                 "--data-dir", str(Path(DATA).resolve())]) == 0  # fmt: skip


@needs_data
def test_overwrite_replaces_the_earlier_run_and_keeps_the_users_files(finished, tmp_path):
    """The earlier run's files go (a stale one must not pass for the new run's), the user's stay
    byte for byte, and the new manifest lists exactly the files now in the run's places."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    write(run / "notes.txt", "mine")
    write(run / "adapters" / "client0" / "stale.txt", "x")  # an earlier run's file, listed below
    listed = json.loads((run / "fedlease-run.json").read_text())["files"]
    (run / "fedlease-run.json").write_text(
        json.dumps({"files": [*listed, "adapters/client0/stale.txt"]})
    )
    assert main(run_with(tmp_path, str(run), "--no-progress", seed=5)) == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "adapters" / "client0" / "stale.txt").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 5
    files = set(json.loads((run / "fedlease-run.json").read_text())["files"])
    assert files == set(snapshot(run)) - {"notes.txt", "fedlease-run.json"}
    assert {
        "summary.json",
        "checkpoint/state.json",
        "adapters/client0/adapter_config.json",
    } <= files


def test_an_internal_error_exits_1_with_one_line_naming_the_traceback_file(tmp_path, monkeypatch,
                                                                          capsys):  # fmt: skip
    """Not the user's input (here a failure inside the run): exit code 1, one line, and the full
    traceback in a file that line names."""
    import tempfile

    import fedlease.fl

    def broken(*args, **kwargs):
        raise RuntimeError("the round failed\nsecond line")

    monkeypatch.setattr(fedlease.fl, "run", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = write(tmp_path / "c.yaml", yaml.safe_dump(TINY | {"data_dir": None}))
    code = main(["run", "--config", cfg, "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "fedlease run: internal error: RuntimeError: the round failed (full traceback in " in err
    path = Path(err.rsplit("full traceback in ", 1)[1].rstrip(")"))
    assert path.parent == tmp_path and "Traceback" in path.read_text()
    assert "second line" in path.read_text()


@needs_data
@pytest.mark.parametrize("command", ["eval", "export"])
def test_an_internal_value_error_in_eval_or_export_is_not_called_bad_input(
    command, finished, tmp_path, monkeypatch, capsys
):
    """Only the bad-input types (``fedlease.errors.user_errors``) mean exit 2: a ValueError from
    inside eval or export is a failure of fedlease (exit 1, its traceback in a file)."""
    import tempfile

    import fedlease.evaluate
    import fedlease.peft_io

    def broken(*args, **kwargs):
        raise ValueError("a bug")

    module, name = {"eval": (fedlease.evaluate, "evaluate_adapter"),
                    "export": (fedlease.peft_io, "export_saved_expert")}[command]  # fmt: skip
    monkeypatch.setattr(module, name, broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    adapter = str(finished / "adapters" / "client0")
    argv = {"eval": ["eval", "--adapter", adapter],
            "export": ["export", "--adapter", adapter, "--expert", "0",
                       "--out", str(tmp_path / "out")]}[command]  # fmt: skip
    assert main(argv) == 1
    assert f"fedlease {command}: internal error: ValueError: a bug" in capsys.readouterr().err


@needs_data
@pytest.mark.parametrize("backend, env, named", [
    ("auto", "nope", "unknown backend 'nope' (from $FEDLEASE_BACKEND)"),
    ("cpp", "triton", "$FEDLEASE_BACKEND: backend 'triton' is unavailable on cpu"),
    ("triton", None, "config key 'backend': backend 'triton' is unavailable on cpu"),
])  # fmt: skip
def test_a_backend_that_cannot_run_here_is_refused_before_the_run(
    backend, env, named, tmp_path, monkeypatch, capsys
):
    """The op backend, from the config or ``$FEDLEASE_BACKEND``, is checked with the device: a
    backend that cannot run here used to end the run with an internal error at its first step."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the suite's Triton runs on CPU
    if env is None:
        monkeypatch.delenv("FEDLEASE_BACKEND", raising=False)
    else:
        monkeypatch.setenv("FEDLEASE_BACKEND", env)
    cfg = config(tmp_path, backend=backend, device="cpu")
    code = main(["run", "--config", cfg, "--output", str(tmp_path / "out"), "--data-dir", DATA,
                 "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and named in err, err
    assert not (tmp_path / "out").exists()


@needs_data
def test_a_run_without_any_round_says_so_and_writes_strict_json(tmp_path, capsys):
    """No warm-up and no rounds evaluate nothing after training: the summary's mean is null
    (JSON has no NaN) and the last line says why, not "nan"."""
    out = tmp_path / "out"
    argv = run_with(tmp_path, str(out), "--data-dir", DATA, "--no-progress", rounds=0,
                    warmup_rounds=0)  # fmt: skip
    assert main(argv) == 0
    summary = strict_json((out / "summary.json").read_text())
    assert summary["final"]["mean"] is None and summary["final"]["per_client"] == []
    assert "mean accuracy not evaluated (no rounds ran)" in capsys.readouterr().out
