"""Property-based checks of the routing math over random shapes and values (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlease.reference import reference_gates, reference_slot_weights
from fedlease.routing import RoutingSpec, route


@st.composite
def routed(draw):
    m = draw(st.integers(1, 8))
    routing = draw(st.sampled_from(["adaptive", "topk", "dense"]))
    top_k = draw(st.integers(1, m)) if routing == "topk" else None
    own = draw(st.integers(0, m - 1))
    spec = RoutingSpec.make(routing, m, top_k, own)
    tokens = draw(st.integers(1, 6))
    # small integer grids make exact ties common; huge magnitudes test overflow
    scale = draw(st.sampled_from([1.0, 1e3, 1e30]))
    values = draw(
        st.lists(st.integers(-3, 3), min_size=tokens * spec.num_slots,
                 max_size=tokens * spec.num_slots)
    )  # fmt: skip
    logits = torch.tensor(values, dtype=torch.float32).reshape(tokens, spec.num_slots) * scale
    return spec, logits


@settings(max_examples=300, deadline=None)
@given(routed())
def test_gates_are_finite_sum_to_one_and_respect_the_spec(case):
    spec, logits = case
    gates, q = route(logits, spec)
    assert torch.isfinite(gates).all() and torch.isfinite(q).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(len(logits)), rtol=0, atol=1e-5)
    assert torch.all(gates >= 0)
    assert torch.all((q > 0).sum(-1) <= spec.keep)
    used = (gates > 0).sum(-1)
    assert torch.all(used >= 1) and torch.all(used <= spec.keep)
    for row, g in zip(logits, gates):
        chosen = {spec.fold[s] for s, _ in reference_slot_weights(row, spec)}
        assert 1 <= len(chosen) <= spec.keep
        if spec.num_slots > spec.num_experts:  # adaptive: the own expert is always selected
            assert spec.fold[-1] in chosen
            # its gate can underflow to 0 only when a logit gap exceeds float32's exp range
            if (row.max() - row.min()).item() < 80:
                assert g[spec.fold[-1]] > 0
        torch.testing.assert_close(g.double(), reference_gates(row, spec), rtol=0, atol=1e-6)
