"""The layer inside other people's training code: gradient checkpointing, torch.compile, the
Hugging Face Trainer and DistributedDataParallel, each on the bundled MiniLM."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import rel_err

from fedlease import MoELoRAConfig, inject_moe_lora, load_adapter
from fedlease.models import load

TEXTS = ["a fine film", "the plot makes no sense at all", "so so", "a triumph"]
LABELS = torch.tensor([1, 0, 1, 1])


def injected(backend="auto", dropout=0.0):
    torch.manual_seed(0)
    model, tok = load("minilm", num_labels=2)
    config = MoELoRAConfig(
        num_experts=3, rank=4, dropout=dropout, routing="adaptive",
        target_modules=["query", "value"], trainable_modules=["classifier"],
    )  # fmt: skip
    inject_moe_lora(model, config, backend=backend)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    return model, tok


def gradients(model, batch, seed=5):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(**batch, labels=LABELS).loss
    loss.backward()
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes the names
    grads = {n: p.grad.clone() for n, p in inner.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_gradient_checkpointing_gives_the_same_gradients():
    """With dropout on (train mode): checkpointing replays the RNG, so the gradients of every
    adapter, router and the head are identical."""
    model, tok = injected(dropout=0.1)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    model.train()
    loss, plain = gradients(model, batch)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable()
    assert ckpt.is_gradient_checkpointing
    loss_c, checkpointed = gradients(ckpt, batch)
    assert torch.equal(loss, loss_c)
    assert plain.keys() == checkpointed.keys() and len(plain) == 12 * 3 + 2
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-6, atol=1e-9), name


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_torch_compile_traces_the_model_without_graph_breaks_and_trains(backend):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward through
    the ops' fake kernels and autograd formulas (inductor's code generation is skipped to keep
    this fast)."""
    from fedlease.ops import available_backends

    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    model, tok = injected(backend)
    model.eval()
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    explanation = torch._dynamo.explain(model)(**batch, labels=LABELS)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager = copy.deepcopy(model)
    loss_e, grads_e = gradients(eager, batch)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_c, grads_c = gradients(compiled, batch)
    assert rel_err(loss_c, loss_e) < 1e-6
    for name in grads_e:
        assert rel_err(grads_c[name], grads_e[name]) < 1e-5, name


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_hf_trainer_trains_and_its_checkpoints_reload(tmp_path, bf16):
    """Trainer (in float32 and in bf16 mixed precision, on every CPU) trains the adapters;
    SaveAdapterCallback writes adapters that restore the trained model on a fresh one. The
    bf16 Trainer leaves the model's forward wrapped in an autocast (the trained model would go on
    computing in bf16): unwrapped as docs/using-the-layer.md says, it computes exactly what the
    restored one does."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from fedlease.integrations import SaveAdapterCallback

    model, tok = injected()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = [dict(tok(t), labels=int(y)) for t, y in zip(TEXTS * 4, LABELS.tolist() * 4)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3,
        save_strategy="steps", save_steps=2, logging_strategy="no", report_to=[], use_cpu=True,
        bf16=bf16,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorWithPadding(tok),
                      callbacks=[SaveAdapterCallback({"model": "minilm"})])  # fmt: skip
    trainer.train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad
               and not torch.equal(p.detach(), before[n])]  # fmt: skip
    assert any(n.endswith("lora_A") for n in changed) and "classifier.weight" in changed
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen  # the base stayed frozen under Trainer
    for step in (2, 4):
        assert (
            tmp_path / f"checkpoint-{step}" / "fedlease_adapter" / "adapter_model.safetensors"
        ).exists()
    restored, _ = injected()
    load_adapter(restored, tmp_path / "fedlease_adapter")
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    wrapped = "_original_forward" in model.__dict__  # accelerate's mixed-precision wrapper
    assert wrapped == bf16
    assert trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False) is model
    assert "_original_forward" not in model.__dict__
    model.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, restored(**batch).logits)


@pytest.mark.slow
def test_ddp_keeps_replicas_identical_with_averaged_gradients(tmp_path):
    out = tmp_path / "ddp.json"
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(worker), str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["params"] == 12 * 3 + 2
    assert result["grad_rel_err"] < 1e-5  # DDP's gradient = the mean of the ranks' gradients
    assert result["replica_max_diff"] == 0.0  # identical replicas after three steps
    assert result["param_change"] > 0  # and they did train
