"""PEFT LoRA adapters in and out: exact round trips with PEFT itself, and clear refusals."""

import json

import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file

from fedlease import MoELoRAConfig, inject_moe_lora, moe_lora_layers, save_adapter
from fedlease.models import load
from fedlease.peft_io import experts_from_peft, export_expert, read_peft_adapter

peft = pytest.importorskip("peft")

SENTENCES = ["a gripping, well acted film", "the plot makes no sense", "fine", "not good at all"]


def batch(tok):
    return tok(SENTENCES, return_tensors="pt", padding=True)


def logits(model, tok):
    model.eval()
    with torch.no_grad():
        return model(**batch(tok)).logits.double()


def fresh():
    torch.manual_seed(123)  # the same frozen model (and head init) every time
    return load("minilm", num_labels=2)


def moe_model(experts=3, seed=0):
    model, tok = fresh()
    config = MoELoRAConfig(num_experts=experts, rank=4, alpha=16, routing="adaptive",
                           own_expert=experts - 1, target_modules=["query", "value"],
                           trainable_modules=["classifier"])  # fmt: skip
    inject_moe_lora(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # A, B, routers and head: all random, none zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, tok


def single_expert(model, e):
    """The reference: a fresh model with one plain expert holding expert ``e`` and the head."""
    ref, _ = fresh()
    config = MoELoRAConfig(
        num_experts=1, rank=4, alpha=16, routing="dense", target_modules=["query", "value"],
        trainable_modules=["classifier"],
    )  # fmt: skip
    inject_moe_lora(ref, config)
    ours = moe_lora_layers(model)
    with torch.no_grad():
        for name, layer in moe_lora_layers(ref).items():
            layer.lora_A[0].copy_(ours[name].lora_A[e])
            layer.lora_B[0].copy_(ours[name].lora_B[e])
        ref.classifier.load_state_dict(model.classifier.state_dict())
    return ref


def peft_adapter(path, r, alpha, seed, targets=("query", "value")):
    """A PEFT LoRA adapter trained by nobody: random A and B, saved by PEFT."""
    base, _ = fresh()
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha,
                                                        target_modules=list(targets)))  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    wrapped.save_pretrained(str(path))
    return path


def test_exported_expert_loads_in_peft_and_computes_that_expert(tmp_path):
    model, tok = moe_model()
    for e in (0, 2):
        out = export_expert(model, e, tmp_path / f"expert{e}")
        base, _ = fresh()
        loaded = peft.PeftModel.from_pretrained(base, str(out))  # no fedlease code involved
        want = logits(single_expert(model, e), tok)
        assert rel_err(logits(loaded, tok), want) < 1e-5
    # the experts differ, so the check above can tell them apart
    assert (
        rel_err(logits(single_expert(model, 0), tok), logits(single_expert(model, 2), tok)) > 1e-3
    )


def test_import_then_export_gives_back_identical_tensors(tmp_path):
    paths = [peft_adapter(tmp_path / f"a{i}", r=4, alpha=16, seed=i) for i in range(2)]
    model, _ = fresh()
    experts_from_peft(model, paths)
    assert len(moe_lora_layers(model)) == 12
    assert all(layer.num_experts == 2 for layer in moe_lora_layers(model).values())
    for e, path in enumerate(paths):
        export_expert(model, e, tmp_path / f"back{e}")
        original = load_file(str(path / "adapter_model.safetensors"))
        back = load_file(str(tmp_path / f"back{e}" / "adapter_model.safetensors"))
        lora = {k for k in original if "lora_" in k}
        assert lora and lora <= set(back)
        for k in lora:
            assert torch.equal(original[k], back[k]), k


def test_adapters_of_different_rank_and_alpha_keep_their_outputs(tmp_path):
    """r 4 / alpha 16 and r 8 / alpha 8 in one model: padded and rescaled, each expert computes
    what its adapter computed under PEFT."""
    paths = [peft_adapter(tmp_path / "r4", 4, 16, seed=1), peft_adapter(tmp_path / "r8", 8, 8, 2)]
    model, tok = fresh()
    experts_from_peft(model, paths, MoELoRAConfig(alpha=32, trainable_modules=["classifier"]))
    layer = next(iter(moe_lora_layers(model).values()))
    assert layer.rank == 8 and layer.alpha == 32 and layer.num_experts == 2
    assert torch.all(layer.lora_A[0, 4:] == 0)  # rank 4 padded with zeros
    for e, path in enumerate(paths):
        base, _ = fresh()
        want = logits(peft.PeftModel.from_pretrained(base, str(path)), tok)
        out = export_expert(model, e, tmp_path / f"out{e}")
        base, _ = fresh()
        got = logits(peft.PeftModel.from_pretrained(base, str(out)), tok)
        assert rel_err(got, want) < 1e-5, e


def test_bad_adapters_are_named(tmp_path):
    model, _ = fresh()
    with pytest.raises(ValueError, match="cannot read PEFT adapter config .*missing"):
        experts_from_peft(model, [tmp_path / "missing"])
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type 'IA3' is not a LoRA adapter"):
        read_peft_adapter(ia3)
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        read_peft_adapter(no_weights)
    # an adapter of another base model: a smaller BERT, same module names, other shapes
    from transformers import BertConfig, BertForSequenceClassification

    tiny = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64)  # fmt: skip
    small = BertForSequenceClassification(tiny)
    other = peft.get_peft_model(small, peft.LoraConfig(r=4, target_modules=["query"]))
    other.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"query has lora_A \(4, 32\).*384 -> 384.*another base"):
        experts_from_peft(model, [tmp_path / "other"])
    assert not moe_lora_layers(model)  # nothing was injected


def test_export_refuses_an_expert_out_of_range(tmp_path):
    model, _ = moe_model()
    with pytest.raises(ValueError, match="expert 3 is out of range: the model has experts 0..2"):
        export_expert(model, 3, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_export(tmp_path, capsys):
    from fedlease.cli import main

    model, tok = moe_model()
    save_adapter(model, tmp_path / "ours", {"model": "minilm", "num_labels": 2})
    assert main(["export", "--adapter", str(tmp_path / "ours"), "--expert", "1",
                 "--out", str(tmp_path / "peft1")]) == 0  # fmt: skip
    base, _ = fresh()
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft1"))
    assert rel_err(logits(loaded, tok), logits(single_expert(model, 1), tok)) < 1e-5
    capsys.readouterr()
    assert main(["export", "--adapter", str(tmp_path / "ours"), "--expert", "7",
                 "--out", str(tmp_path / "peft7")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--expert 7 is out of range" in err and err.count("\n") == 1
    assert not (tmp_path / "peft7").exists()
    assert main(["export", "--adapter", str(tmp_path / "nowhere"), "--expert", "0",
                 "--out", str(tmp_path / "peft0")]) == 2  # fmt: skip
    assert "cannot read adapter config" in capsys.readouterr().err
    assert not (tmp_path / "peft0").exists()
