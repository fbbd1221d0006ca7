"""Clients trained in lockstep (``client_batch``) against the same clients trained one by one:
the slot optimizer against torch's, a stacked model against single-client models, and whole runs
of every method (dropout off) to 1e-5."""

import io
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import assert_same_run, interrupted
from torch import nn

from fedlease import MoELoRAConfig, adapter_state_dict, inject_moe_lora, load_adapter_state_dict
from fedlease.clients import load_slot, set_active, set_own_experts, stack_clients
from fedlease.fl import from_dict, inprocess, limits
from fedlease.fl.batched import LockstepTrainer, SlotOptimizer
from fedlease.fl.simulator import run, simulation
from fedlease.fl.strategies import STRATEGIES
from fedlease.fl.types import TrainSpec
from fedlease.inject import set_own_expert
from fedlease.models import load

DATA = os.environ.get("FEDLEASE_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA, reason="FEDLEASE_DATA_DIR not set")
TINY = {"clients": ["sst2", "mrpc", "sst2", "mrpc", "qnli"], "precision": "fp32",
        "train_samples": 16, "test_samples": 8, "warmup_rounds": 1, "rounds": 2,
        "local_epochs": 1, "batch_size": 8, "max_seq_len": 20, "max_experts": 2, "threads": 1,
        "seed": 2, "dropout": 0.0}  # fmt: skip


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_slot_optimizer_is_torchs_per_slot(optimizer):
    """Three slots, steps over changing subsets (a slot leaves and stays out): each slot ends
    where torch's optimizer, run on that slot alone for the steps it took, leaves it."""
    spec = TrainSpec(optimizer, 0.01, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    stacked = nn.Parameter(torch.randn(3, 4, 5, generator=g))
    alone = [nn.Parameter(stacked.detach()[i].clone()) for i in range(3)]
    opts = [spec.make([p]) for p in alone]
    slot_opt = SlotOptimizer([stacked], spec)
    for slots in ([0, 1, 2], [0, 1, 2], [0, 2], [0, 2]):  # slot 1 drops out after two steps
        grads = torch.randn(3, 4, 5, generator=g)
        stacked.grad = grads.clone()
        slot_opt.step(slots)
        for i in slots:
            alone[i].grad = grads[i].clone()
            opts[i].step()
    for i in range(3):
        assert torch.allclose(stacked.detach()[i], alone[i].detach(), rtol=1e-6, atol=1e-7), i


def _minilm():
    torch.manual_seed(0)
    model, tok = load("minilm", num_labels=2)
    inject_moe_lora(model, MoELoRAConfig(num_experts=3, rank=4, trainable_modules=["classifier"]))
    return model.eval(), tok


def test_a_stacked_model_computes_each_clients_model():
    """Three clients' adapters, routers, heads and own experts in the slots of one model: each
    client's examples get the logits of its own single-client model, whichever slots are active
    and in whatever order."""
    model, tok = _minilm()
    g = torch.Generator().manual_seed(1)
    states = [{k: torch.randn(v.shape, generator=g) * 0.05 for k, v in
               adapter_state_dict(model).items()} for _ in range(3)]  # fmt: skip
    texts = [["a fine film", "dull"], ["so so and long indeed", "great"], ["bad", "meh meh meh"]]
    want = []
    for i in range(3):
        load_adapter_state_dict(model, states[i])
        set_own_expert(model, i)
        want.append(model(**tok(texts[i], return_tensors="pt", padding=True)).logits)
    import copy

    stacked = stack_clients(copy.deepcopy(model), 3)
    for i in range(3):
        load_slot(stacked, i, states[i])
    set_own_experts(stacked, [0, 1, 2])
    for order in ([0, 1, 2], [2, 0]):
        set_active(stacked, order)
        batch = tok([t for i in order for t in texts[i]], return_tensors="pt", padding=True)
        got = stacked(**batch).logits.view(len(order), 2, 2)
        for k, i in enumerate(order):
            assert torch.allclose(got[k], want[i], rtol=1e-5, atol=1e-6), (order, i)


def _no_dropout(monkeypatch):
    """Every dropout off (the model's too): the lockstep run and the one-by-one run then see the
    same network, and must agree to rounding."""
    original = inprocess.load_base

    def load_base(cfg, rt):
        base, tok = original(cfg, rt)
        for m in base.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        base.config.attention_probs_dropout_prob = 0.0
        return base, tok

    monkeypatch.setattr(inprocess, "load_base", load_base)


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("method", list(STRATEGIES))
def test_every_method_trains_the_same_in_lockstep(method, monkeypatch):
    _no_dropout(monkeypatch)
    cfg = from_dict(TINY | {"method": method, "data_dir": DATA})
    one = simulation(cfg, progress=False)
    one.run()
    together = simulation(from_dict(cfg.to_dict() | {"client_batch": 3}), progress=False)
    together.run()
    assert_same_run(one, together)


@pytest.mark.slow
@needs_data
def test_lockstep_with_sampling_crashes_nan_updates_and_a_resume(tmp_path, monkeypatch):
    """Partial participation, injected crashes and NaN updates, B averaged over the warm-up, and
    a lockstep run interrupted after round 2 and resumed: the one-by-one run's results."""
    _no_dropout(monkeypatch)
    faults = {"client_failure_rate": 0.3, "nan_update_rate": 0.3, "seed": 2}
    raw = TINY | {"data_dir": DATA, "rounds": 3, "clients_per_round": 3, "warmup_average_b": True,
                  "faults": faults}  # fmt: skip
    one = simulation(from_dict(raw), progress=False)
    one.run()
    assert any(row["failed"] for row in one.rec.rows) and any(r["rejected"] for r in one.rec.rows)
    cfg = from_dict(raw | {"client_batch": "auto"})
    interrupted(lambda: run(cfg, tmp_path / "run", progress=False), 2, monkeypatch)
    resumed = simulation(cfg, tmp_path / "run", progress=False, resume=True)
    summary = resumed.run()
    # auto on the CPU: the 3 participants train at once, the 5 clients are evaluated one by one
    assert resumed.resumed_from == 2 and summary.client_batch == 3
    assert_same_run(one, resumed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_data
def test_lockstep_on_cuda_trains_as_one_by_one(monkeypatch):
    """The lockstep trainer on a GPU (its optimizer's slot indices, held experts, B means and
    batches on the model's device): with injected crashes (slots leaving a step) and B averaged,
    the one-by-one run on the same GPU. Rounding on the GPU differs more between GEMM shapes, so
    losses and scores are held to 1e-4."""
    _no_dropout(monkeypatch)
    faults = {"client_failure_rate": 0.3, "seed": 2}
    raw = TINY | {"data_dir": DATA, "device": "cuda", "warmup_average_b": True, "faults": faults}
    one = simulation(from_dict(raw), progress=False)
    one.run()
    together = simulation(from_dict(raw | {"client_batch": 3}), progress=False)
    together.run()
    assert any(row["failed"] for row in one.rec.rows)
    assert_same_run(one, together, tol=1e-4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
@needs_data
def test_lockstep_with_the_triton_client_form_trains_as_one_by_one(monkeypatch):
    """The lockstep trainer on the ``triton`` op (every layer call one launch per kernel for all
    clients, here in Triton's interpreter): B averaged, the one-by-one run to 1e-5. The query
    layers only: an interpreted layer step costs about 2 s, and the value layers add no path."""
    _no_dropout(monkeypatch)
    raw = TINY | {"data_dir": DATA, "backend": "triton", "clients": ["sst2", "mrpc", "sst2"],
                  "train_samples": 8, "test_samples": 4, "rounds": 1, "max_seq_len": 8,
                  "warmup_average_b": True, "target_modules": ["query"]}  # fmt: skip
    one = simulation(from_dict(raw), progress=False)
    one.run()
    together = simulation(from_dict(raw | {"client_batch": 3}), progress=False)
    together.run()
    assert_same_run(one, together)


V1, V2 = "/sys/fs/cgroup/memory/a/memory.limit_in_bytes", "/sys/fs/cgroup/job/memory.max"
ROOT_V2 = "/sys/fs/cgroup/memory.max"
CGROUPS = {  # the files a process in a control group reads, and the limit they set
    "v2": ({"/proc/self/cgroup": "0::/job\n", V2: "1073741824\n"}, 2**30),
    "v2-no-limit": ({"/proc/self/cgroup": "0::/job\n", V2: "max\n"}, None),
    "v2-root": ({"/proc/self/cgroup": "0::/job\n", ROOT_V2: "3221225472"}, 3 * 2**30),
    "v1": ({"/proc/self/cgroup": "4:memory:/a\n1:cpu:/\n", V1: "2147483648"}, 2 * 2**30),
    "v1-no-limit": ({"/proc/self/cgroup": "4:memory:/a\n", V1: "9223372036854771712"}, None),
    "unreadable": ({}, None),
}


@pytest.mark.parametrize("files, want", CGROUPS.values(), ids=CGROUPS)
def test_machine_memory_is_the_lower_of_the_machines_and_its_control_groups(monkeypatch, files,
                                                                            want):  # fmt: skip
    """``auto``'s CPU groups follow the machine's memory (MemTotal, or a lower cgroup limit),
    which does not change with what else runs, not the memory available at the moment."""
    meminfo = "MemTotal:       4194304 kB\nMemAvailable:    1000 kB\n"

    def fake_open(name, *args, **kwargs):
        text = {"/proc/meminfo": meminfo, **files}.get(name)
        if text is None:
            raise FileNotFoundError(name)
        return io.StringIO(text)

    monkeypatch.setattr(limits, "open", fake_open, raising=False)
    assert limits._cgroup_limit() == want
    assert limits.machine_bytes() == min(4 * 2**30, want or 2**62)
    assert limits.available_bytes() == 1000 * 1024


def test_auto_on_the_cpu_takes_up_to_sixteen_classification_clients_within_memory(monkeypatch):
    """As measured on a CPU: 16 GLUE clients at once gained most, 4 SmolLM2 clients at once lost,
    and evaluation in lockstep lost for both (it evaluates one by one there); fewer classification
    clients where half the machine's memory holds fewer worst-case steps."""
    monkeypatch.setattr(inprocess, "machine_bytes", lambda: 64 * 2**30)
    for task_type, want in (("classification", [16, 6, 1]), ("generation", [1, 1, 1])):
        cfg = from_dict({"task_type": task_type, "clients": ["sst2"] * 20, "device": "cpu",
                         "client_batch": "auto", "batch_size": 16, "max_seq_len": 128})  # fmt: skip
        transport = inprocess.InProcess(cfg, progress=False)
        transport.step_units = 384 * 6  # MiniLM's hidden units times layers
        assert [transport.client_batch(n) for n in (20, 6, 1)] == want, task_type
        assert [transport.client_batch(n, evaluation=True) for n in (20, 3)] == [1, 1]
    step = 16 * 128 * 384 * 6 * inprocess.STEP_BYTES_PER_UNIT  # one client's worst step
    monkeypatch.setattr(inprocess, "machine_bytes", lambda: 5 * step)
    cfg = from_dict({"clients": ["sst2"] * 20, "device": "cpu", "client_batch": "auto",
                     "batch_size": 16, "max_seq_len": 128})  # fmt: skip
    transport = inprocess.InProcess(cfg, progress=False)
    transport.step_units = 384 * 6
    assert transport.client_batch(20) == 2  # half of 5 steps' memory
    fixed = inprocess.InProcess(from_dict({"clients": ["sst2"] * 6, "device": "cpu",
                                           "client_batch": 4}), progress=False)  # fmt: skip
    assert fixed.client_batch(6, evaluation=True) == 4  # a number is taken as it is


def test_groups_follow_length_and_keep_apart_only_padded_lengths():
    """Clients group in order of their median lengths; with padding-free batches whatever the
    lengths, with padded batches only within LENGTH_SPREAD of each other."""
    transport = inprocess.InProcess(from_dict({"clients": ["sst2"] * 5}), progress=False)
    transport.data = [SimpleNamespace(typical_length=n) for n in (50, 10, 48, 12, 55)]
    transport.pool = SimpleNamespace(packs=True)
    assert transport.groups([0, 1, 2, 3, 4], 4) == [[1, 3, 2, 0], [4]]
    transport.pool = SimpleNamespace(packs=False)
    assert transport.groups([0, 1, 2, 3, 4], 4) == [[1, 3], [2, 0, 4]]
    assert transport.groups([0, 1, 2], 1) == [[0], [1], [2]]


@needs_data
def test_candidate_losses_together_are_each_clients_loss_alone():
    """IFCA's picking losses of three clients in one lockstep pass (chunks of 5 of the first 12
    training examples, a client with fewer examples dropping out of the last step), each on its
    own random adapters: what each client's model alone gives (``ClientRunner.train_loss``);
    another client's adapters give another loss (a row on the wrong slot would show)."""
    from fedlease.fl.types import Layout

    cfg = from_dict(TINY | {"data_dir": DATA, "method": "ifca", "eval_batch_size": 5})
    transport = simulation(cfg, progress=False).transport
    transport.start()
    pool, layout, data = transport.pool, Layout(), transport.data[:3]
    data[2].train.labels = data[2].train.labels[:9]
    for k in data[2].train.features:
        data[2].train.features[k] = data[2].train.features[k][:9]
    torch.manual_seed(3)
    states = [{k: (torch.randn_like(v) if k.endswith("lora_B") else v.clone())
               for k, v in pool.template(layout).items()} for _ in data]  # fmt: skip
    got = pool.lockstep(layout, 3).train_losses(data, states, [None] * 3, 12)
    runner = pool.runner(layout)
    want = [runner.train_loss(c, state, 12) for c, state in zip(data, states)]
    assert got == pytest.approx(want, rel=1e-5)
    assert runner.train_loss(data[0], states[1], 12) != pytest.approx(want[0], rel=1e-3)


@pytest.mark.slow
@needs_data
def test_auto_halves_a_group_that_runs_out_of_memory(monkeypatch):
    """``client_batch: auto`` on a device that holds only 2 clients at once (a trainer of more
    slots raises torch's out-of-memory error at its first step, training or evaluating): the
    run goes on with groups of 2, equals the run with ``client_batch: 2`` and says 2."""
    _no_dropout(monkeypatch)
    for name in ("train", "evaluate"):
        original = getattr(LockstepTrainer, name)

        def limited(self, clients, *args, original=original, **kwargs):
            if self.model.client_slots > 2:
                raise torch.OutOfMemoryError("out of memory (simulated)")
            return original(self, clients, *args, **kwargs)

        monkeypatch.setattr(LockstepTrainer, name, limited)
    cfg = from_dict(TINY | {"data_dir": DATA, "client_batch": "auto"})
    auto = simulation(cfg, progress=False)
    summary = auto.run()
    two = simulation(from_dict(cfg.to_dict() | {"client_batch": 2}), progress=False)
    two.run()
    assert summary.client_batch == 2
    assert_same_run(two, auto)
    fixed = simulation(from_dict(cfg.to_dict() | {"client_batch": 4}), progress=False)
    with pytest.raises(torch.OutOfMemoryError):  # a number the user chose is not changed
        fixed.run()


def test_dropout_in_lockstep_is_dropout_with_other_masks():
    """With dropout on, one draw covers the whole step: other masks than one by one, the same
    distribution. The mean loss of a stacked model in train mode over many seeds equals the
    single-client model's within 4 standard errors."""
    model, tok = _minilm()
    import copy

    stacked = stack_clients(copy.deepcopy(model), 2)
    for m in (model, stacked):
        m.train()
    texts = ["a fine film", "dull and long"]
    labels = torch.tensor([1, 0])

    def losses(m, batch, y):
        out = []
        for seed in range(40):
            torch.manual_seed(seed)
            with torch.no_grad():
                logits = m(**batch).logits
            out.append(nn.functional.cross_entropy(logits, y).item())
        return np.array(out)

    single = losses(model, tok(texts, return_tensors="pt", padding=True), labels)
    together = losses(stacked, tok(texts * 2, return_tensors="pt", padding=True), labels.repeat(2))
    se = math.sqrt(single.var(ddof=1) / len(single) + together.var(ddof=1) / len(together))
    assert single.std() > 0 and abs(single.mean() - together.mean()) < 4 * se
