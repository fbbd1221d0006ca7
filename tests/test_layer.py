"""MoELoRALinear: construction, init, gates, and equivalence with PEFT's LoRA for M = 1."""

import pytest
import torch
from torch import nn

from fedlease import MoELoRALinear
from fedlease.reference import reference_moe_lora


def test_fresh_layer_equals_base_and_shapes():
    base = nn.Linear(12, 10)
    layer = MoELoRALinear(base, num_experts=3, rank=4, own_expert=2)
    assert layer.lora_A.shape == (3, 4, 12)
    assert layer.lora_B.shape == (3, 10, 4)
    assert layer.router.shape == (5, 12)
    assert MoELoRALinear(nn.Linear(12, 10), 3, 4, routing="topk", top_k=2).router.shape == (3, 12)
    assert MoELoRALinear(nn.Linear(12, 10), 3, 4, routing="dense").router.shape == (3, 12)
    assert torch.all(layer.lora_B == 0) and layer.lora_A.abs().sum() > 0
    assert layer.router.abs().sum() > 0
    x = torch.randn(4, 7, 12)
    torch.testing.assert_close(layer(x), base(x))
    assert not base.weight.requires_grad
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "lora_A",
        "lora_B",
        "router",
    }


def test_forward_matches_reference_and_gates():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(16, 8), num_experts=4, rank=2, alpha=8, own_expert=3)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 16)
    y = layer(x)
    want = reference_moe_lora(
        x, layer.base(x), layer.lora_A, layer.lora_B, layer.router, layer.spec, 4.0
    )
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    g = layer.gates(x)
    assert g.shape == (3, 5, 4)
    assert torch.all(g[..., 3] > 0)


def test_own_expert_setter_changes_routing():
    layer = MoELoRALinear(nn.Linear(8, 8), num_experts=3, rank=2)
    x = torch.randn(50, 8)
    assert torch.all(layer.gates(x)[:, 0] > 0)
    layer.own_expert = 2
    assert layer.own_expert == 2 and layer.spec.fold == (0, 1, 2, 2, 2)
    assert torch.all(layer.gates(x)[:, 2] > 0)
    with pytest.raises(ValueError, match="own_expert.*5"):
        layer.own_expert = 5


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"rank": 0}, "rank.*0"),
        ({"rank": -2}, "rank.*-2"),
        ({"num_experts": 0}, "num_experts.*0"),
        ({"own_expert": 4}, "own_expert.*4"),
        ({"dropout": 1.5}, "dropout.*1.5"),
        ({"routing": "hash"}, "routing.*'hash'"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, pattern):
    args = {"num_experts": 3, "rank": 4} | kwargs
    with pytest.raises(ValueError, match=pattern):
        MoELoRALinear(nn.Linear(8, 8), **args)


def test_base_must_be_linear():
    with pytest.raises(ValueError, match="Conv1d"):
        MoELoRALinear(nn.Conv1d(2, 2, 1), 2, 2)


def test_single_dense_expert_equals_peft_lora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(20, 14))
    base_copy = nn.Linear(20, 14)
    base_copy.load_state_dict(net.proj.state_dict())
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(net, cfg)
    lora_layer = peft_model.base_model.model.proj
    nn.init.normal_(lora_layer.lora_B["default"].weight)
    ours = MoELoRALinear(base_copy, num_experts=1, rank=4, alpha=8, routing="dense")
    with torch.no_grad():
        ours.lora_A[0].copy_(lora_layer.lora_A["default"].weight)
        ours.lora_B[0].copy_(lora_layer.lora_B["default"].weight)
    x = torch.randn(6, 9, 20)
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-6, atol=1e-6)
