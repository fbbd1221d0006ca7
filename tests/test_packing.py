"""Padding-free batches (``fedlease.packing``) against the padded model they replace: logits and
gradients, fp32 and bf16, one client and several clients' unequal shares of one batch."""

import copy

import pytest
import torch
from helpers import PAIRS, logits_and_grads, moe_minilm, pair_batch, rel_err
from torch import nn

from fedlease import (
    adapter_state_dict,
    load_adapter_state_dict,
    packing,
)
from fedlease.clients import load_slot, set_active, set_own_experts, stack_clients
from fedlease.inject import set_own_expert
from fedlease.packing import bucket_spans, packable, packs, plan, row_length, use_packing
from fedlease.precision import cast_frozen


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 3e-2)])
def test_a_packed_model_computes_the_padded_model(precision, tol, monkeypatch):
    """Same logits and gradients of every trainable tensor (experts, routers, head), whatever
    the padding of each row; the batch really is packed (the padded model never sees it), its
    rows attending in three buckets (free buckets: one per span), out of their batch order."""
    monkeypatch.setattr(packing, "BUCKET_COST", 0)
    model, tok = moe_minilm()
    model.train()
    if precision == "bf16":
        cast_frozen(model, torch.bfloat16)
    batch = pair_batch(tok)
    assert [b.rows for b in plan(batch["attention_mask"]).buckets] == [1, 2, 1]
    want_logits, want_grads = logits_and_grads(model, batch, precision)
    use_packing(model)
    seen = []
    hook = model.bert.embeddings.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    got_logits, got_grads = logits_and_grads(model, batch, precision)
    hook.remove()
    real = int(batch["attention_mask"].sum())
    assert seen == [torch.Size([1, row_length(real), 384])]
    assert real < row_length(real) < batch["attention_mask"].numel()  # fillers, less than padding
    assert rel_err(got_logits, want_logits) < tol
    for name, want in want_grads.items():
        assert rel_err(got_grads[name], want) < tol, name


def test_the_packed_row_is_rounded_to_a_32nd_of_its_power_of_two():
    assert [row_length(n) for n in (1, 5, 8, 100, 1000, 1024, 1025, 5000)] == [
        8, 8, 8, 104, 1024, 1024, 1088, 5120]  # fmt: skip


def test_batches_without_right_padding_run_as_they_are():
    """No padding, padding on the left or an empty row: no packing plan, the model's own
    computation."""
    assert plan(torch.ones(3, 5, dtype=torch.long)) is None
    assert plan(torch.tensor([[0, 1, 1], [1, 1, 1]])) is None
    assert plan(torch.tensor([[1, 1, 0], [0, 0, 0]])) is None  # an empty row
    got = plan(torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]]))  # 6 real tokens, 2 fillers
    assert got.source.tolist() == [0, 1, 3, 4, 5, 6, 9, 9] and (got.batch, got.length) == (3, 3)
    assert got.real.tolist() == list(range(6))
    shares = plan(torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]), 2)
    assert [(s.start, s.real, s.tokens) for s in shares.segments] == [(0, 3, 8), (8, 7, 8)]
    assert shares.source.tolist() == [0, 1, 4] + [16] * 5 + [8, 9, 10, 11, 12, 13, 14, 16]
    # both clients' rows in one 4 x 8 block; each filler a place of its own after it
    assert [(b.rows, b.span) for b in shares.buckets] == [(4, 8)] and shares.fillers == 6
    assert shares.slots.tolist() == ([0, 1, 8] + list(range(32, 37)) + [16, 17, 18, 19]
                                     + [24, 25, 26, 37])  # fmt: skip
    model, tok = moe_minilm()
    model.eval()
    batch = tok(["same length", "same length"], return_tensors="pt", padding=True)
    want = model(**batch).logits
    use_packing(model)
    assert torch.equal(model(**batch).logits, want)


def test_rows_attend_in_buckets_of_about_their_length_whoever_they_belong_to():
    """Rows go to buckets by length (rounded up to 8), the cheapest partition by the cost model:
    far apart lengths apart, near ones together, few rows of a length with their neighbours; the
    buckets hold each row's real tokens at its own block row, zeros elsewhere."""
    assert bucket_spans([3] * 5 + [120]) == [8, 120]
    assert bucket_spans([60, 61, 70, 3]) == [72]  # one short row: cheaper padded than apart
    assert bucket_spans([60, 61, 70, 3, 3, 3]) == [8, 72]  # 64 and 72 together
    assert bucket_spans([5, 9, 17]) == [24]  # three near spans: one block
    assert bucket_spans([16] * 16 + [100] * 16) == [16, 104]
    lengths = [[3, 100, 50], [2, 98, 52], [5, 101, 49]]  # three clients' three rows each
    mask = torch.tensor([[1] * n + [0] * (104 - n) for rows in lengths for n in rows])
    packed = plan(mask, shares=3)
    assert [(b.rows, b.span) for b in packed.buckets] == [(3, 8), (3, 56), (3, 104)]
    row = torch.randn(len(packed.source), 2, 4)  # packed tokens, heads, head_dim
    blocks = packed.blocks(row)
    assert all(b.is_contiguous() for b in blocks)
    short = row[packed.real[:3]].transpose(0, 1)  # the first client's first row: 3 real tokens
    assert torch.equal(blocks[0][:, 0, :3], short) and not blocks[0][:, 0, 3:].any()
    second = 3 + 100 + 50 + 2  # the second client's second row: its 98 real tokens
    assert torch.equal(blocks[2][:, 1, :98], row[packed.real[second : second + 98]].transpose(0, 1))
    assert not blocks[2][:, 1, 98:].any() and blocks[1].abs().sum() > 0
    back = packed.unblock(list(blocks))
    assert back.is_contiguous() and torch.equal(back[packed.real], row[packed.real])
    fillers = torch.ones(len(packed.source), dtype=torch.bool)
    fillers[packed.real] = False
    assert fillers.any() and not back[fillers].any()
    keys = packed.buckets[2].key_mask[0, :, 0]
    assert (keys[0, :100] == 0).all() and (keys[1, 98:] < -1e30).all() and keys[1, 97] == 0


def test_blocks_and_back_have_the_gradients_of_their_gathers(monkeypatch):
    """The round trip through the buckets' blocks (gathers both ways, custom backward) against
    ``torch.autograd.gradcheck`` in float64: the padding holds zeros and takes no gradient."""
    monkeypatch.setattr(packing, "BUCKET_COST", 0)  # a bucket per span
    mask = torch.tensor([[1] * n + [0] * (20 - n) for n in (3, 17, 9, 20, 2, 11)])
    packed = plan(mask, shares=2)
    assert len(packed.buckets) > 1 and packed.fillers > 0
    weights = [torch.randn(b.shape, dtype=torch.float64) for b in packed.blocks(
        torch.zeros(len(packed.source), 3, 2, dtype=torch.float64))]  # fmt: skip

    def through(row):
        blocks = packed.blocks(row)
        mixed = [b * w + b.sum(2, keepdim=True) for b, w in zip(blocks, weights)]  # rows mix
        return packed.unblock(mixed), blocks

    row = torch.randn(len(packed.source), 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: through(r)[0], (row,))
    for bucket, block in zip(packed.buckets, through(row)[1]):
        pad = bucket.key_mask[0, :, 0] < 0  # (rows, span): the block's padding
        assert not block[:, pad].any() and block[:, ~pad].abs().sum() > 0


def test_dropout_in_a_packed_batch_trains():
    """With every dropout on (fused attention softmax, the layers' own masks): finite logits and
    gradients, different masks from call to call, the same under the same seed."""
    model, tok = moe_minilm(dropout=True)
    use_packing(model).train()
    batch = pair_batch(tok)
    torch.manual_seed(3)
    a, grads = logits_and_grads(model, batch)
    torch.manual_seed(3)
    b, _ = logits_and_grads(model, batch)
    c, _ = logits_and_grads(model, batch)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(g.isfinite().all() and g.abs().sum() > 0 for g in grads.values())


def test_several_clients_in_one_packed_batch_each_get_their_own_model(monkeypatch):
    """Three clients' slots in one stacked, packed model; their rows hold different numbers of
    real tokens (and attend in buckets that mix clients): each client's logits and its slot's
    gradients are those of its own model."""
    monkeypatch.setattr(packing, "BUCKET_COST", 0)
    model, tok = moe_minilm()
    g = torch.Generator().manual_seed(5)
    states = [{k: torch.randn(v.shape, generator=g) * 0.1 for k, v in
               adapter_state_dict(model).items()} for _ in range(3)]  # fmt: skip
    parts = [[PAIRS[0], PAIRS[3]], PAIRS[1:3], [PAIRS[2], PAIRS[0]]]  # unequal token counts
    want = []
    for i in range(3):
        load_adapter_state_dict(model, states[i])
        set_own_expert(model, i)
        logits, grads = logits_and_grads(model, pair_batch(tok, parts[i]))
        want.append((logits, grads))
    stacked = stack_clients(use_packing(copy.deepcopy(model)), 3)
    for i in range(3):
        load_slot(stacked, i, states[i])
    set_own_experts(stacked, [0, 1, 2])
    for order in ([0, 1, 2], [2, 0]):
        set_active(stacked, order)
        batch = pair_batch(tok, [p for i in order for p in parts[i]])
        logits, grads = logits_and_grads(stacked, batch)
        for k, i in enumerate(order):
            assert rel_err(logits.view(len(order), 2, 2)[k], want[i][0]) < 1e-5, (order, i)
            for name, w in want[i][1].items():
                assert rel_err(grads[name][i], w) < 1e-5, (order, i, name)
    layers = [m for m in stacked.modules() if getattr(m, "token_shares", "x") != "x"]
    assert layers and all(m.token_shares is None for m in layers)  # cleared after the forward


def test_packing_is_refused_for_decoders_and_undone_on_request():
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2))  # fmt: skip
    assert "llama" in packable(tiny)
    with pytest.raises(ValueError, match="cannot pack sequences: model type 'llama'"):
        use_packing(tiny)
    model, _ = moe_minilm()
    use_packing(use_packing(model))  # twice: one pair of hooks
    assert packs(model) and packs(copy.deepcopy(model))
    assert len(model.bert._forward_pre_hooks) == 1 and len(model.bert.encoder._forward_hooks) == 1
    use_packing(model, False)
    assert not packs(model) and not model.bert.encoder._forward_hooks


def test_the_packed_attention_backward_never_builds_a_whole_row_per_client():
    """Each client's queries, keys and values come from one split of the packed row: no backward
    node gives a client's part a gradient the size of the whole row (a slice per client would:
    N zero-filled rows added up, N^2 work for N clients)."""
    from fedlease.dropout import _packed_attention

    lengths = [[5, 3], [7, 7], [2, 6], [4, 1]]  # four clients' two rows each
    mask = torch.tensor([[1] * n + [0] * (8 - n) for pair in lengths for n in pair])
    packed = plan(mask, shares=4)
    tokens = len(packed.source)
    qkv = [torch.randn(1, 2, tokens, 4, requires_grad=True) for _ in range(3)]
    out, _ = _packed_attention(nn.Module().eval(), *qkv, 0.5, 0.0, packed)
    seen, stack, names = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        if node.name() == "SliceBackward0":
            assert node._saved_self_sym_sizes[node._saved_dim] < tokens, "a slice of the row"
        stack += [next_node for next_node, _ in node.next_functions]
    assert names.count("SplitWithSizesBackward0") == 3  # queries, keys, values: one split each
    out.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in qkv)
