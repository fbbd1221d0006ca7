"""Shared test helpers: fresh random inputs and relative errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from fedlease import MoELoRAConfig, adapter_state_dict, inject_moe_lora, load_adapter_state_dict
from fedlease.models import load
from fedlease.precision import autocast
from fedlease.routing import RoutingSpec


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in float64."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def make_inputs(
    tokens: int,
    d_in: int,
    d_out: int,
    experts: int,
    rank: int,
    routing: str = "adaptive",
    top_k: int | None = None,
    own: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int | None = None,
):
    """Random (never zero) x, base_out, A, B, router and the routing spec."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    spec = RoutingSpec.make(routing, experts, top_k, own)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    x = rnd(tokens, d_in)
    base = rnd(tokens, d_out)
    a = rnd(experts, rank, d_in, scale=d_in**-0.5)
    b = rnd(experts, d_out, rank, scale=rank**-0.5)
    router = rnd(spec.num_slots, d_in, scale=d_in**-0.5 * 3)
    return x, base, a, b, router, spec


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def kill_after_rounds(cmd: list[str], run_dir, rounds: int, poll_s: float = 0.05) -> None:
    """Start ``cmd`` (a ``fedlease run`` writing to ``run_dir``) and SIGKILL it as soon as its
    checkpoint holds ``rounds`` complete rounds; fails if it ends before."""
    import json
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run_dir / "checkpoint" / "state.json"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if state.exists() and json.loads(state.read_text())["rounds_done"] >= rounds:
                break
            assert proc.poll() is None, "the run ended before it could be interrupted"
            time.sleep(poll_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def clients_reference(x, base, a, b, router, specs, scaling, masks=None) -> torch.Tensor:
    """Client-stacked inputs (leading dimension N), each client alone through the per-token
    reference with its own spec (and dropout mask)."""
    from fedlease.reference import reference_moe_lora

    return torch.stack([
        reference_moe_lora(x[i], base[i], a[i], b[i], router[i], specs[i], scaling,
                           None if masks is None else masks[i])
        for i in range(len(specs))
    ])  # fmt: skip


def op_dropout_mask(backend: str, shape, p: float, rng_seed: int) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p)) a CPU backend's op applies to an input of ``shape``
    after ``torch.manual_seed(rng_seed)``: aten's mask for ``torch``; for ``cpp`` and ``triton``
    the counter-based mask of the seed the op draws from torch's generator, keyed by the row
    among all of a call's rows (``shape``: (rows, features), every client's rows)."""
    import torch.nn.functional as F

    torch.manual_seed(rng_seed)
    if backend == "torch":
        return F.dropout(torch.ones(shape), p, training=True)
    if backend == "triton":
        from fedlease.ops import triton_backend

        return triton_backend.dropout_mask(triton_backend._draw_seed(), *shape, p, "cpu")
    from fedlease.ops.cpp_backend import draw_seed

    return torch.ops.fedlease.philox_dropout(torch.ones(shape), p, draw_seed())[0]


ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """A script of benchmarks/ or studies/ imported as a module, to test its functions; its
    folder is on the path while it loads (scripts import their neighbours, e.g. timing.py)."""
    import importlib.util
    import sys

    path = ROOT / relpath
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def _rel(a, b) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


def assert_same_run(a, b, tol: float = 1e-5,
                    state_tol: float = 1e-2) -> None:  # fmt: skip
    """Per-round train losses and scores to ``tol``, the allocation, every client's final state
    to ``state_tol``. Final states are held to what fp32 training repeats of itself: AdamW turns
    rounding-level gradient differences into sign-level updates where a gradient is near zero,
    and B starts at zero, so relative errors of B grow. The one-by-one run with 2 threads instead
    of 1 ends 1.3e-4 (FedLEASE), 2.9e-4 (FedIT), 4.4e-4 (FedSA-LoRA) and 3.3e-3 (local) away
    from itself (measured on test_batched's clients at 24 examples of 24 tokens); lockstep
    against one by one: 1.5e-4, 1.3e-4, 3.7e-4, 1.2e-3. A wrong data order, optimizer state or
    own expert moves states by O(1)."""
    assert a.strategy.assignment() == b.strategy.assignment()
    for row_a, row_b in zip(a.rec.rows, b.rec.rows, strict=True):
        assert row_a["participants"] == row_b["participants"]
        assert row_a["failed"] == row_b["failed"] and row_a["rejected"] == row_b["rejected"]
        for ca, cb in zip(row_a["clients"], row_b["clients"], strict=True):
            for key in ("train_loss", "accuracy", "eval_loss"):
                if ca.get(key) is not None and not math.isnan(ca[key]):
                    assert _rel(ca[key], cb[key]) < tol, (row_a["round"], ca["client"], key)
    for ka, kb in zip(a.transport.kept, b.transport.kept, strict=True):
        for name, t in ka.items():
            err = (kb[name].double() - t.double()).norm() / t.double().norm().clamp_min(1e-30)
            assert err < state_tol, name


def assert_fwd_bwd_close(y, y_ref, fast, ref, names, tol: float = 1e-5) -> None:
    """``y`` against the float64 reference ``y_ref`` to ``tol``, then one random backward
    through both and every input's gradient (``fast`` and ``ref`` in the order of ``names``)."""
    assert rel_err(y, y_ref) < tol
    dy = torch.randn_like(y_ref)
    y.backward(dy.to(y.dtype))
    y_ref.backward(dy)
    for name, f, r in zip(names, fast, ref):
        assert rel_err(f.grad, r.grad) < tol, name


def interrupted(run_fn, after_rounds: int, monkeypatch) -> None:
    """``run_fn()`` (a run with an output directory) stopped as by Ctrl-C once ``after_rounds``
    rounds are checkpointed; the checkpointing is as it was afterwards."""
    import pytest

    from fedlease.fl.driver import RoundDriver

    original = RoundDriver.save_checkpoint

    def stop(self, rounds_done):
        original(self, rounds_done)
        if rounds_done == after_rounds:
            raise KeyboardInterrupt

    monkeypatch.setattr(RoundDriver, "save_checkpoint", stop)
    with pytest.raises(KeyboardInterrupt):
        run_fn()
    monkeypatch.setattr(RoundDriver, "save_checkpoint", original)


# MiniLM with MoE-LoRA on sentence pairs (the packing and first-token tests)
PAIRS = [("a fine film", "it was fine"), ("dull", "a much longer second sentence of the pair here"),
         ("so so and long indeed, with many more words than the others", "ok"),
         ("bad", "meh")]  # fmt: skip


def moe_minilm(dropout: bool = False):
    """MiniLM with MoE-LoRA (random B: the adapters matter), every dropout off unless asked."""
    torch.manual_seed(0)
    model, tok = load("minilm", num_labels=2, attn="eager")
    if not dropout:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    cfg = MoELoRAConfig(num_experts=3, rank=4, dropout=0.1 if dropout else 0.0,
                        trainable_modules=["classifier"])  # fmt: skip
    inject_moe_lora(model, cfg)
    g = torch.Generator().manual_seed(1)
    load_adapter_state_dict(model, {k: torch.randn(v.shape, generator=g) * 0.1
                                    for k, v in adapter_state_dict(model).items()})  # fmt: skip
    return model, tok


def pair_batch(tok, pairs=PAIRS):
    first, second = zip(*pairs)
    return tok(list(first), list(second), return_tensors="pt", padding=True)


def logits_and_grads(model, batch, precision="fp32"):
    model.zero_grad(set_to_none=True)
    with autocast(torch.device("cpu"), precision):
        logits = model(**batch).logits.float()
    (logits * torch.arange(1.0, 3.0)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def tiny_llama(seed=0):
    """A randomly initialised 2-layer Llama (vocabulary 97, hidden 32) in float64, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)  # fmt: skip
    return LlamaForCausalLM(cfg).double().eval()


def strict_json(text: str):
    """``text`` parsed as a strict JSON parser would: ``NaN`` or ``Infinity`` fail the test."""

    def refuse(name):
        raise AssertionError(f"the JSON holds {name}, which strict parsers refuse")

    return json.loads(text, parse_constant=refuse)
