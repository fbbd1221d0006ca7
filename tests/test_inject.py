"""MoE-LoRA injected into the bundled MiniLM: what trains, forward/backward, save/load."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedlease import (
    MoELoRAConfig,
    MoELoRALinear,
    adapter_state_dict,
    inject_moe_lora,
    load_adapter,
    load_adapter_state_dict,
    moe_lora_layers,
    save_adapter,
    set_own_expert,
)
from fedlease.models import load


@pytest.fixture(scope="module")
def minilm():
    return load("minilm", num_labels=3)


def fresh(minilm_pair, **kw):
    model, tok = minilm_pair
    import copy

    model = copy.deepcopy(model)
    cfg = MoELoRAConfig(num_experts=3, rank=4, trainable_modules=["classifier"], **kw)
    return inject_moe_lora(model, cfg), tok


def test_bundled_model_loads(minilm):
    model, tok = minilm
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert model.classifier.out_features == 3
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id


def test_injection_replaces_targets_and_freezes_the_rest(minilm):
    model, _ = fresh(minilm)
    layers = moe_lora_layers(model)
    assert len(layers) == 12
    assert all(n.endswith(("attention.self.query", "attention.self.value")) for n in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n in trainable:
        assert n.endswith((".lora_A", ".lora_B", ".router")) or n.startswith("classifier."), n
    assert "classifier.weight" in trainable and "classifier.bias" in trainable
    assert len(trainable) == 12 * 3 + 2
    assert set(adapter_state_dict(model)) == trainable


def test_forward_backward_and_only_adapters_get_grads(minilm):
    model, tok = fresh(minilm, dropout=0.1)
    model.train()
    batch = tok(["one sentence", "and another, longer one"], padding=True, return_tensors="pt")
    out = model(**batch, labels=torch.tensor([0, 2]))
    out.loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_save_load_round_trip_is_bit_exact(minilm, tmp_path):
    model, tok = fresh(minilm)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.copy_(torch.randn_like(p))
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())["moe_lora"]
    assert cfg["num_experts"] == 3 and cfg["target_modules"] == ["query", "value"]
    other, _ = fresh(minilm)
    load_adapter(other, tmp_path)
    for k, v in adapter_state_dict(model).items():
        assert torch.equal(v, adapter_state_dict(other)[k]), k
    model.eval()
    other.eval()
    batch = tok(["same output"], return_tensors="pt")
    assert torch.equal(model(**batch).logits, other(**batch).logits)


def test_load_refuses_mismatches(minilm, tmp_path):
    model, _ = fresh(minilm)
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    key = "bert.encoder.layer.0.attention.self.query.lora_A"
    bad = dict(state)
    bad.pop(key)
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \[.*layer\.0\.attention\.self\.query"):
        load_adapter_state_dict(model, bad)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra\.weight'\]"):
        load_adapter_state_dict(model, bad)
    bad = dict(state)
    bad[key] = torch.zeros(3, 4, 10)
    with pytest.raises(
        ValueError, match=r"query\.lora_A: shape \(3, 4, 10\), expected \(3, 4, 384\)"
    ):
        load_adapter_state_dict(model, bad)
    save_adapter(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        load_adapter(model, tmp_path)
    save_file({key: torch.zeros(3, 4, 10)}, str(weights))
    with pytest.raises(ValueError, match="shape"):
        load_adapter(model, tmp_path)
    assert load_file(str(weights))[key].shape == (3, 4, 10)


def test_set_own_expert(minilm):
    model, _ = fresh(minilm)
    set_own_expert(model, 2)
    assert all(layer.own_expert == 2 for layer in moe_lora_layers(model).values())
    assert model.moe_lora_config.own_expert == 2


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"target_modules": ["query", "nothing_here"]}, "'nothing_here'"),
        ({"target_modules": ["attention"]}, "BertAttention"),
        ({"target_modules": ["LayerNorm"]}, "LayerNorm"),
        ({"rank": 0}, "rank.*0"),
        ({"num_experts": 0}, "num_experts.*0"),
        ({"own_expert": 7}, "own_expert.*7"),
        ({"trainable_modules": ["head_that_is_not_there"]}, "'head_that_is_not_there'"),
    ],
)
def test_bad_injection_names_the_value(minilm, kw, pattern):
    model, _ = minilm
    import copy

    cfg = MoELoRAConfig(num_experts=kw.pop("num_experts", 3), **kw)
    with pytest.raises(ValueError, match=pattern):
        inject_moe_lora(copy.deepcopy(model), cfg)


def test_injected_layers_are_moe_lora(minilm):
    model, _ = fresh(minilm)
    q = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(q, MoELoRALinear) and q.spec.num_slots == 5
