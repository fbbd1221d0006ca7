"""Routing math: properties on random inputs, and agreement with the per-token reference."""

import pytest
import torch

from fedlease.reference import reference_gates
from fedlease.routing import RoutingSpec, route, slot_probs, slot_probs_backward


@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("own", [0, -1])
def test_adaptive_properties(m, own):
    own = own % m
    spec = RoutingSpec.make("adaptive", m, own_expert=own)
    assert spec.num_slots == 2 * m - 1 and spec.keep == m
    logits = torch.randn(500, spec.num_slots) * 3
    gates, q = route(logits, spec)
    assert gates.shape == (500, m)
    assert torch.all(gates[:, own] > 0), "own expert must be chosen for every token"
    used = (gates > 0).sum(-1)
    assert used.min() >= 1 and used.max() <= m
    torch.testing.assert_close(gates.sum(-1), torch.ones(500))
    # exactly `keep` slots are nonzero and they are the most probable ones
    assert torch.all((q > 0).sum(-1) == spec.keep)
    p = torch.softmax(logits, -1)
    kth = p.topk(spec.keep, -1).values[:, -1:]
    assert torch.all(p[q > 0] >= kth.expand_as(p)[q > 0])
    assert torch.all(q[p < kth] == 0)


def test_adaptive_uses_several_experts_sometimes():
    spec = RoutingSpec.make("adaptive", 4, own_expert=2)
    gates, _ = route(torch.randn(2000, spec.num_slots) * 2, spec)
    counts = (gates > 0).sum(-1)
    assert set(counts.unique().tolist()) == {1, 2, 3, 4}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk(k):
    spec = RoutingSpec.make("topk", 4, top_k=k)
    logits = torch.randn(300, 4)
    gates, _ = route(logits, spec)
    assert torch.all((gates > 0).sum(-1) == k)
    top = logits.topk(k, -1)
    want = torch.zeros_like(gates).scatter(-1, top.indices, torch.softmax(top.values, -1))
    torch.testing.assert_close(gates, want)


def test_dense_is_softmax():
    spec = RoutingSpec.make("dense", 5)
    logits = torch.randn(100, 5)
    gates, _ = route(logits, spec)
    torch.testing.assert_close(gates, torch.softmax(logits, -1))


def test_matches_reference_per_token():
    spec = RoutingSpec.make("adaptive", 3, own_expert=1)
    logits = torch.randn(64, spec.num_slots) * 2
    gates, _ = route(logits, spec)
    want = torch.stack([reference_gates(row, spec) for row in logits])
    torch.testing.assert_close(gates.double(), want, rtol=1e-6, atol=1e-7)


def test_ties_go_to_lower_slot_and_large_logits_stay_finite():
    spec = RoutingSpec.make("adaptive", 3, own_expert=2)
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [1e4, -1e4, 1e4, 5e3, 1e4]])
    gates, _ = route(logits, spec)
    assert torch.isfinite(gates).all()
    # all equal: slots 0,1,2 win -> experts 0,1,2 each 1/3
    torch.testing.assert_close(gates[0], torch.full((3,), 1 / 3))
    # slots 0, 2, 4 tie at the top -> experts 0, 2, 2
    torch.testing.assert_close(gates[1], torch.tensor([1 / 3, 0.0, 2 / 3]))
    for row in logits:
        torch.testing.assert_close(reference_gates(row, spec).float(), route(row, spec)[0])


def test_restricted_softmax_backward_matches_autograd():
    logits = torch.randn(40, 7, dtype=torch.float64, requires_grad=True)
    q = slot_probs(logits, 4)
    dq = torch.randn_like(q)
    (q * dq).sum().backward()
    torch.testing.assert_close(slot_probs_backward(q.detach(), dq), logits.grad)


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"routing": "adaptive", "num_experts": 0}, "0"),
        ({"routing": "sparse", "num_experts": 2}, "'sparse'"),
        ({"routing": "adaptive", "num_experts": 3, "own_expert": 3}, "3"),
        ({"routing": "topk", "num_experts": 3, "top_k": 4}, "4"),
        ({"routing": "topk", "num_experts": 3}, "None"),
    ],
)
def test_bad_specs_name_the_value(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        RoutingSpec.make(**kwargs)


@pytest.mark.parametrize("slots,keep", [(7, 4), (15, 8), (3, 1), (24, 5)])
def test_kept_slots_comparisons_match_a_stable_sort(slots, keep, monkeypatch):
    """The pairwise-comparison ranking and the sort fallback keep the same slots, ties included
    (integer-valued logits tie often; the lower slot wins)."""
    from fedlease import routing

    g = torch.Generator().manual_seed(slots * 31 + keep)
    logits = torch.randint(-3, 4, (257, slots), generator=g).float()
    chosen = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :keep]
    want = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, chosen, True)
    for limit in (0, 64):  # 0: always sort; 64: always compare
        monkeypatch.setattr(routing, "COMPARE_MAX_SLOTS", limit)
        got = routing.kept_slots(logits, keep)
        assert torch.equal(got, want), limit
        assert torch.all(got.sum(-1) == keep)
