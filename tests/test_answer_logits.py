"""A causal LM's loss over its answers with logits at the answer tokens only: equal to the model's
own loss and gradients (one client, and clients in equal parts of a batch), the output embedding
given only those rows, and the model's own forward where that would not be the same model."""

import pytest
import torch
from helpers import rel_err, tiny_llama

from fedlease import MoELoRAConfig, inject_moe_lora
from fedlease.data.tokenize import IGNORE_INDEX
from fedlease.generation.loss import answer_loss, answer_losses, answers_only
from fedlease.precision import autocast, cast_frozen


def moe_llama(targets=("q_proj", "v_proj"), seed=0):
    model = tiny_llama(seed).float()
    inject_moe_lora(model, MoELoRAConfig(num_experts=3, rank=4, alpha=8, dropout=0.0,
                                         target_modules=list(targets)))  # fmt: skip
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # B starts at zero: the experts would not count
    return model


def answer_batch(rows=6, length=24, seed=0):
    """Rows of a prompt then an answer (targets) then right padding, of random lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX)
    for r in range(rows):
        real = int(torch.randint(length // 2, length + 1, (1,), generator=g))
        start = int(torch.randint(2, real - 1, (1,), generator=g))
        mask[r, real:], ids[r, real:] = 0, 0
        labels[r, start:real] = ids[r, start:real]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, batch, parts, all_logits):
    model.zero_grad(set_to_none=True)
    sums, counts = answer_losses(model, batch, parts, all_logits)
    (sums / counts).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return sums.detach(), counts, grads


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_answer_logits_give_the_models_own_losses_and_gradients(parts, precision):
    model, batch = moe_llama(), answer_batch()
    tol = {"fp32": 1e-5, "bf16": 2e-2}[precision]
    if precision == "bf16":
        cast_frozen(model, torch.bfloat16)
    assert answers_only(model)
    with autocast(torch.device("cpu"), precision):
        got = loss_and_grads(model, batch, parts, all_logits=False)
        want = loss_and_grads(model, batch, parts, all_logits=True)
    assert torch.equal(got[1], want[1]) and got[1].sum() == (batch["labels"][:, 1:] >= 0).sum()
    assert rel_err(got[0], want[0]) < tol
    assert got[2].keys() == want[2].keys() and len(got[2]) > 0
    for name in want[2]:
        assert rel_err(got[2][name], want[2][name]) < tol, name
    rows = len(batch["labels"]) // parts
    for k in range(parts):  # each part's rows alone through transformers' causal LM loss (a mean)
        part = {key: v[k * rows : (k + 1) * rows] for key, v in batch.items()}
        with autocast(torch.device("cpu"), precision):
            own = model(**part).loss.detach()
            mean = answer_loss(model, part).detach()
        assert rel_err(mean, own) < tol
        assert rel_err(got[0][k] / got[1][k], own) < tol


def test_the_output_embedding_sees_the_answer_tokens_only():
    model, batch = moe_llama(), answer_batch(seed=1)
    rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    _, counts = answer_losses(model, batch)
    assert rows == [torch.Size([int(counts.sum()), 32])]
    assert int(counts.sum()) < batch["input_ids"].numel() // 2


def test_other_models_and_an_adapted_output_embedding_use_the_models_forward():
    """A class whose logits may be more than its output embedding (here GPT-2, not listed), or an
    output embedding with experts (a linear layer no longer), computes every position's logits;
    the loss is still the model's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=1,
                                      n_head=2)).eval()  # fmt: skip
    adapted = moe_llama(targets=("q_proj", "v_proj", "lm_head"))
    batch = answer_batch(seed=2)
    for model in (gpt2, adapted):
        assert not answers_only(model)
        assert rel_err(answer_loss(model, batch).detach(), model(**batch).loss.detach()) < 1e-6


def test_a_batch_without_targets_has_zero_loss_and_zero_gradients():
    model, batch = moe_llama(), answer_batch(rows=2, seed=3)
    batch["labels"][:] = IGNORE_INDEX
    loss = answer_loss(model, batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
