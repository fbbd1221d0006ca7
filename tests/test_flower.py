"""FedLEASE on Flower: run config parsing, tensors in records, and real deployments (one
SuperLink and four SuperNodes on 127.0.0.1) checked against the in-process simulator."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli  # Flower's own dependency; the standard library's tomllib needs Python 3.11
import torch
import yaml

from fedlease.fl import ConfigError, from_dict
from fedlease.flower.records import from_record, parse_run_config, to_record

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("FEDLEASE_DATA_DIR")
TINY = {"clients": ["sst2", "mrpc", "sst2", "mrpc"], "precision": "fp32", "train_samples": 16,
        "test_samples": 16,
        "warmup_rounds": 1, "rounds": 2, "local_epochs": 1, "max_seq_len": 32,
        "max_experts": 2, "threads": 1, "seed": 5}  # fmt: skip


def app_config() -> dict:
    return tomli.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def as_run_config(cfg: dict) -> dict:
    """FLConfig keys as Flower run-config entries (lists and mappings as YAML strings without
    spaces; mappings in JSON's layout with single quotes)."""

    def entry(v):
        if isinstance(v, list):
            return "[" + ",".join(v) + "]"
        if isinstance(v, dict):  # single quotes: the run-config string is double-quoted
            return json.dumps(v, separators=(",", ":")).replace('"', "'")
        return v

    return {k.replace("_", "-"): entry(v) for k, v in cfg.items()}


def test_the_app_config_is_a_valid_run_config_and_covers_every_key():
    from fedlease.fl import FLConfig

    cfg, opts = parse_run_config(app_config())
    assert cfg.clients == ["sst2", "mrpc", "sst2", "mrpc"] and cfg.label_alpha is None
    assert cfg.threads is None and cfg.faults is None and opts.min_results == 0
    # Flower refuses --run-config keys missing from the app config: every key must be there
    keys = {k.replace("-", "_") for k in app_config()}
    assert set(FLConfig.__dataclass_fields__) <= keys
    # model and target modules follow the task type unless set
    assert (cfg.model, cfg.target_modules) == ("minilm", ["query", "value"])
    flan = {"task-type": "generation", "clients": "[common_gen, cola, gigaword]"}
    gen, _ = parse_run_config({**app_config(), **flan})
    assert (gen.model, gen.target_modules) == ("smollm2", ["q_proj", "v_proj"])
    own, _ = parse_run_config({**app_config(), "model": "prajjwal1/bert-tiny"})
    assert own.model == "prajjwal1/bert-tiny"


def test_run_config_values_are_checked_like_a_config_file():
    cfg, _ = parse_run_config({**app_config(), **as_run_config(TINY)})
    assert cfg == from_dict(TINY)
    with pytest.raises(ConfigError, match="'rank' must be"):
        parse_run_config({**app_config(), "rank": "four"})
    with pytest.raises(ConfigError, match="'round-timeout' = 0.0"):
        parse_run_config({**app_config(), "round-timeout": 0.0})
    # the server's own options: typed as TOML types them, or spelt as strings; never bool("false")
    _, opts = parse_run_config({**app_config(), "resume": "false", "overwrite": True,
                                "min-results": "2", "node-timeout": 30})  # fmt: skip
    assert (opts.resume, opts.overwrite, opts.min_results) == (False, True, 2)
    assert opts.node_timeout == 30
    assert isinstance(opts.node_timeout, float)
    for key, value, named in [("resume", "maybe", "'resume' = 'maybe': must be bool"),
                              ("resume", 1, "must be bool"), ("min-results", 1.5, "must be int"),
                              ("min-results", "two", "must be int"),
                              ("node-timeout", 0, "'node-timeout' = 0.0: must be > 0"),
                              ("round-timeout", "inf", "must be > 0"),
                              ("output-dir", "", "'output-dir' is empty")]:  # fmt: skip
        with pytest.raises(ConfigError, match=named):
            parse_run_config({**app_config(), key: value})


@pytest.mark.parametrize("pid, named", [(1.5, "1.5"), ("one", "'one'"), (True, "True"),
                                         (-1, "-1"), (7, "7 is outside 0..3")])  # fmt: skip
def test_a_node_with_a_bad_partition_id_is_refused_before_it_loads_anything(pid, named):
    from flwr.app import Context, RecordDict

    from fedlease.flower.client_app import node_for

    run_config = {**app_config(), **as_run_config(TINY)}
    context = Context(1, 1, {"partition-id": pid}, RecordDict(), run_config)
    with pytest.raises(ConfigError, match=f"node config partition-id {named}"):
        node_for(context)


def _flower_logs(exc: Exception) -> str:
    """What Flower's log shows when an app raises ``exc`` (the call Flower's ServerApp and
    ClientApp runners make), through a handler of Flower's logger."""
    import io
    import logging

    from flwr.common.logger import FLOWER_LOGGER, log

    import fedlease.flower  # noqa: F401  (as loading the app does)

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    FLOWER_LOGGER.addHandler(handler)
    try:
        try:
            raise exc
        except Exception as ex:
            log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=ex)
    finally:
        FLOWER_LOGGER.removeHandler(handler)
    return stream.getvalue()


def test_a_users_error_inside_an_app_is_one_line_in_flowers_log():
    text = _flower_logs(ConfigError("run config 'rank' = 'four': must be int"))
    assert text == "ERROR: ServerApp raised an exception: run config 'rank' = 'four': must be int\n"
    assert "Traceback" in _flower_logs(RuntimeError("a failure of fedlease itself"))


def test_tensors_survive_records_with_names_shapes_and_dtypes():
    state = {"copy1:enc.q.lora_A": torch.randn(2, 3, 5),
             "classifier.weight": torch.randn(2, 4, dtype=torch.float64)}  # fmt: skip
    back = from_record(to_record(state))
    assert list(back) == list(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k])


def _simulate(tmp_path: Path, cfg: dict) -> dict:
    """The same config through ``fedlease run`` in its own process (same thread count)."""
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sim"
    subprocess.run([sys.executable, "-m", "fedlease", "run", "--config", str(path), "--output",
                    str(out), "--no-progress"], check=True, capture_output=True)  # fmt: skip
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.skipif(not DATA, reason="FEDLEASE_DATA_DIR not set")
def test_deployment_engine_matches_the_simulator(tmp_path):
    """Over TLS (a CA made in the test) with SuperNode authentication: four registered nodes run
    the federation; a fifth, with the CA but an unregistered key, is refused by the SuperLink and
    the run goes on without it. The ServerApp is killed mid-run and the run resumed: the result
    equals the in-process simulator's uninterrupted run."""
    from flower_local import LocalFederation

    out = tmp_path / "flower"
    start = time.time()
    # warm-up, allocation, one adaptive round: every message type; client 1 uploads float64
    # tensors, which the server must reject (as the simulator does) with the reason logged
    cfg = {**TINY, "rounds": 1, "attacks": {"clients": [1], "kind": "wrong_dtype"}}
    run_cfg = {**as_run_config(cfg), "output-dir": str(out)}
    with LocalFederation(tmp_path / "fed", 5, DATA, tls=True, registered={0, 1, 2, 3}) as fed:
        # The ServerApp is killed once the warm-up round is checkpointed; `resume = true` goes on
        # from there (the clients from their own saved states) to the simulator's result.
        first = fed.start_run(run_cfg)
        state = out / "checkpoint" / "state.json"
        deadline = time.time() + 400
        while not state.exists():
            assert first.poll() is None, fed.log("flwr-run")[-3000:]
            assert time.time() < deadline, "the first round did not finish"
            time.sleep(0.2)
        assert fed.kill_serverapp(), "no ServerApp process found"
        first.kill()
        first.wait()
        rc, log = fed.run({**run_cfg, "resume": True}, timeout=540)
        refused = fed.procs[1 + 4]
        refused.wait(timeout=120)
        node4 = fed.log("supernode4")
        procs = list(fed.procs)
    assert rc == 0, log[-3000:]
    assert all(p.poll() is not None for p in procs)  # every process started was stopped
    assert refused.returncode != 0
    # Flower's FLEET_NODE_ACTIVATION_FAILED: no SuperNode is registered with that public key
    assert "[code: 2004] Failed to activate SuperNode" in node4, node4[-2000:]
    flower = json.loads((out / "summary.json").read_text())
    assert 1 <= flower["resumed_from_round"] < flower["rounds"], flower["resumed_from_round"]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["rejected"] == [1] and "dtype float64" in last["clients"][1]["reason"], last
    sim = _simulate(tmp_path, cfg)
    assert flower["assignment"] == sim["assignment"] and flower["num_experts"] == 2
    assert flower["comm_bytes"] == sim["comm_bytes"]  # the same tensors travel
    for a, b in zip(flower["final"]["per_client"], sim["final"]["per_client"]):
        assert a["client"] == b["client"]
        assert abs(a["accuracy"] - b["accuracy"]) <= 1e-6, (a, b)
        assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-4, (a, b)
    for name in ("metrics.jsonl", "clusters.json", "accuracy.png", "dendrogram.png"):
        assert (out / name).exists(), name
    print(f"deployment run + simulator: {time.time() - start:.0f} s")


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.skipif(not DATA, reason="FEDLEASE_DATA_DIR not set")
def test_a_client_that_disconnects_mid_run_does_not_hang_the_server(tmp_path):
    from flower_local import LocalFederation

    out = tmp_path / "flower"
    # FedIT: no allocation step, which needs every client; two rounds, the node dies after one
    run_cfg = {**TINY, "method": "fedit", "warmup_rounds": 1, "rounds": 1}
    cfg = {**as_run_config(run_cfg), "output-dir": str(out), "round-timeout": 120.0,
           "min-results": 3}  # fmt: skip
    with LocalFederation(tmp_path / "fed", 4, DATA) as fed:
        run = fed.start_run(cfg)
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 400
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 1):
            assert run.poll() is None, fed.log("flwr-run")[-3000:]
            assert time.time() < deadline, "the first round did not finish"
            time.sleep(0.2)
        fed.kill_node(3)  # client 3 vanishes before the last round
        rc, log = fed.wait(run, timeout=300)
        assert rc == 0, log[-3000:]
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    last = rows[-1]
    assert last["failed"] == [3]
    # the SuperLink reports the lost node (or the round times out): either way it is named
    assert last["clients"][3]["error"], last["clients"][3]
    print("client 3:", last["clients"][3]["error"], f"round wall {last['wall_s']:.0f} s")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert 0.0 <= summary["final"]["mean"] <= 1.0  # the three clients that answered


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.skipif(not DATA, reason="FEDLEASE_DATA_DIR not set")
@pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="the Flower simulation engine needs ray: pip install 'fedlease[flower-sim]'",
)
def test_simulation_engine_matches_the_simulator(tmp_path):
    from flower_local import BIN, ROOT, _toml, flower_env

    home = tmp_path / "home"
    env = flower_env(home)
    out = tmp_path / "flower"
    items = " ".join(f"{k}={_toml(v)}" for k, v in
                     {**as_run_config(TINY), "output-dir": str(out)}.items())  # fmt: skip
    try:
        done = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "local", "--stream",
                               "--federation-config", "num-supernodes=4", "--run-config", items],
                              env=env, capture_output=True, text=True, timeout=540)  # fmt: skip
    finally:  # `flwr run` leaves the local simulation SuperLink running: stop it by PID
        found = subprocess.run(["pgrep", "-f", str(home / "local-superlink")],
                               capture_output=True, text=True).stdout.split()  # fmt: skip
        for pid in found:
            os.kill(int(pid), signal.SIGTERM)
    assert done.returncode == 0 and "ServerApp raised" not in done.stdout, done.stdout[-3000:]
    flower = json.loads((out / "summary.json").read_text())
    sim = _simulate(tmp_path, TINY)
    assert flower["assignment"] == sim["assignment"]
    assert flower["comm_bytes"] == sim["comm_bytes"]
    for a, b in zip(flower["final"]["per_client"], sim["final"]["per_client"]):
        assert abs(a["accuracy"] - b["accuracy"]) <= 1e-6, (a, b)


def test_the_app_bundle_holds_the_package_code_only(tmp_path):
    """`flwr run` ships the checkout as a FAB (at most 10 MB): results, configs or a data copy
    beside the code must stay out of it."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist()
    code = [n for n in names if n not in ("pyproject.toml", ".info/CONTENT")]
    assert "fedlease/flower/client_app.py" in code and "kernels/__init__.py" in code
    outside = [n for n in code if not n.startswith(("fedlease/", "kernels/"))]
    assert not outside, outside[:5]
