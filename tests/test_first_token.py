"""The last encoder layer for the first token only (``fedlease.first_token``) against the full
model: logits and gradients, padded and packed batches, one client and several in lockstep."""

import copy

import pytest
import torch
from helpers import PAIRS, logits_and_grads, moe_minilm, pair_batch, rel_err

from fedlease import adapter_state_dict, load_adapter_state_dict, packing
from fedlease.clients import load_slot, set_active, set_own_experts, stack_clients
from fedlease.dropout import register_attention
from fedlease.first_token import unsupported, use_first_token_output
from fedlease.inject import set_own_expert
from fedlease.models import load
from fedlease.packing import use_packing
from fedlease.precision import cast_frozen


def _tokens_through(module, run) -> list[int]:
    """How many tokens ``module`` (a linear layer) saw in each call of ``run()``."""
    seen = []
    hook = module.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[:-1].numel()))
    run()
    hook.remove()
    return seen


def _assert_close(got, want, tol):
    assert rel_err(got[0], want[0]) < tol
    for name, w in want[1].items():
        assert rel_err(got[1][name], w) < tol, name


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 3e-2)])
def test_the_first_token_model_computes_the_full_model(packed, precision, tol, monkeypatch):
    """Same logits and gradients of every trainable tensor (the last layer's experts and
    routers among them); the last layer's query and feed-forward really see one token a
    sequence, its key and value every token."""
    monkeypatch.setattr(packing, "BUCKET_COST", 0)  # the packed rows in three buckets
    model, tok = moe_minilm()
    model.train()
    if packed:
        use_packing(model)
    if precision == "bf16":
        cast_frozen(model, torch.bfloat16)
    batch = pair_batch(tok)
    want = logits_and_grads(model, batch, precision)
    use_first_token_output(model)
    last = model.bert.encoder.layer[-1]
    got = []
    run = lambda: got.append(logits_and_grads(model, batch, precision))  # noqa: E731
    queries = _tokens_through(last.attention.self.query, run)
    _assert_close(got[0], want, tol)
    assert queries == [len(PAIRS)]
    keys = _tokens_through(last.attention.self.key, run)
    ffn = _tokens_through(last.intermediate.dense, run)
    everything = int(batch["attention_mask"].sum()) if packed else batch["input_ids"].numel()
    assert keys[0] >= everything and ffn == [len(PAIRS)]
    use_first_token_output(model, False)
    assert _tokens_through(last.intermediate.dense, run)[0] >= everything


@pytest.mark.parametrize("attn", ["sdpa", "fedlease_eager"])
def test_every_attention_implementation_gets_the_first_token_query(attn):
    """The last layer's one query a sequence through SDPA and fedlease's eager attention (its
    fused softmax and dropout in training: dropout 0 here, so the same numbers)."""
    model, tok = moe_minilm()
    register_attention()
    model.set_attn_implementation(attn)
    model.train()
    batch = pair_batch(tok)
    want = logits_and_grads(model, batch)
    _assert_close(logits_and_grads(use_first_token_output(model), batch), want, 1e-5)


def test_several_clients_in_one_packed_batch_each_get_their_own_model(monkeypatch):
    """Three clients' slots in one stacked, packed, first-token model: each client's logits
    and its slot's gradients are those of its own full model."""
    monkeypatch.setattr(packing, "BUCKET_COST", 0)
    model, tok = moe_minilm()
    g = torch.Generator().manual_seed(5)
    states = [{k: torch.randn(v.shape, generator=g) * 0.1 for k, v in
               adapter_state_dict(model).items()} for _ in range(3)]  # fmt: skip
    parts = [[PAIRS[0], PAIRS[3]], PAIRS[1:3], [PAIRS[2], PAIRS[0]]]
    want = []
    for i in range(3):
        load_adapter_state_dict(model, states[i])
        set_own_expert(model, i)
        want.append(logits_and_grads(model, pair_batch(tok, parts[i])))
    for pack in (False, True):
        single = use_first_token_output(copy.deepcopy(model))
        stacked = stack_clients(use_packing(single) if pack else single, 3)
        for i in range(3):
            load_slot(stacked, i, states[i])
        set_own_experts(stacked, [0, 1, 2])
        set_active(stacked, [2, 0])
        logits, grads = logits_and_grads(stacked, pair_batch(tok, parts[2] + parts[0]))
        for k, i in enumerate([2, 0]):
            got = (logits.view(2, 2, 2)[k], {name: grads[name][i] for name in want[i][1]})
            _assert_close(got, want[i], 1e-5)


def test_a_call_asking_for_every_hidden_state_gets_the_full_last_layer():
    model, tok = moe_minilm()
    use_first_token_output(model)
    batch = pair_batch(tok)
    out = model(**batch, output_hidden_states=True)
    assert out.hidden_states[-1].shape == (*batch["input_ids"].shape, 384)
    assert model.bert(**batch).last_hidden_state.shape == (len(PAIRS), 1, 384)


def test_models_whose_head_reads_every_token_are_refused():
    model, _ = load("minilm", num_labels=2)
    assert unsupported(model) is None
    assert "is not one of" in unsupported(model.bert)
    with pytest.raises(ValueError, match="cannot compute the first token only"):
        use_first_token_output(model.bert)
