"""A short tour of the MoE-LoRA layer on the bundled MiniLM model."""

from __future__ import annotations

import torch

from . import MoELoRAConfig, inject_moe_lora, moe_lora_layers
from .models import load
from .ops import available_backends, resolve_backend


def layer_demo(num_experts: int = 3, rank: int = 4, seed: int = 0) -> dict:
    """Inject adaptive MoE-LoRA into MiniLM, take one training step, report what it computed."""
    torch.manual_seed(seed)
    model, tokenizer = load("minilm", num_labels=2)
    config = MoELoRAConfig(
        num_experts=num_experts, rank=rank, own_expert=1, trainable_modules=["classifier"]
    )
    inject_moe_lora(model, config)
    batch = tokenizer(
        ["a gripping, beautifully shot film", "tedious and far too long"],
        padding=True,
        return_tensors="pt",
    )
    labels = torch.tensor([1, 0])
    layers = moe_lora_layers(model)
    name, layer = next(iter(layers.items()))
    with torch.no_grad():
        hidden = model.bert.embeddings(batch["input_ids"])
        gates = layer.gates(hidden)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss0 = model(**batch, labels=labels).loss
    loss0.backward()
    optim.step()
    loss1 = model(**batch, labels=labels).loss.item()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        "backend": resolve_backend(layer.backend, hidden.device).name,
        "available_backends": available_backends("cpu"),
        "layers": len(layers),
        "first_layer": name,
        "trainable_params": trainable,
        "total_params": total,
        "distinct_experts_per_token": (gates > 0).sum(-1).flatten().tolist(),
        "own_expert_gate_min": gates[..., 1].min().item(),
        "gate_sums_max_err": (gates.sum(-1) - 1).abs().max().item(),
        "loss_before": loss0.item(),
        "loss_after_one_step": loss1,
    }


def print_layer_demo() -> None:
    r = layer_demo()
    print(f"MiniLM with {r['layers']} MoE-LoRA layers (3 experts, rank 4, adaptive top-M routing)")
    print(f"  backend in use: {r['backend']}   available on cpu: {r['available_backends']}")
    print(f"  trainable parameters: {r['trainable_params']:,} of {r['total_params']:,}")
    print(f"  {r['first_layer']}: distinct experts per token {r['distinct_experts_per_token']}")
    print(f"  own expert's smallest gate {r['own_expert_gate_min']:.3f} (always chosen, > 0)")
    print(f"  largest |sum of gates - 1| {r['gate_sums_max_err']:.2e}")
    print(f"  loss {r['loss_before']:.4f} -> {r['loss_after_one_step']:.4f} after one AdamW step")
