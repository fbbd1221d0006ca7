"""Every available backend of the MoE-LoRA op against the per-token reference, fwd and bwd."""

import pytest
import torch
from helpers import leaves, make_inputs, op_dropout_mask, rel_err

from fedlease.ops import available_backends, moe_lora
from fedlease.reference import reference_moe_lora

CPU_BACKENDS = available_backends("cpu")
# relative-error bounds against a float64 reference, per input dtype
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 3e-3, torch.bfloat16: 2e-2}

SHAPES = [  # tokens, d_in, d_out, experts, rank, routing, top_k
    (37, 24, 40, 3, 4, "adaptive", None),
    (64, 48, 32, 4, 8, "adaptive", None),
    (5, 16, 16, 1, 4, "adaptive", None),
    (29, 32, 20, 5, 16, "adaptive", None),
    (33, 40, 24, 4, 4, "topk", 2),
    (18, 20, 36, 3, 8, "dense", None),
]


def run_both(backend, shape, dtype, own=0):
    t, d_in, d_out, m, r, routing, k = shape
    x, base, a, b, router, spec = make_inputs(t, d_in, d_out, m, r, routing, k, own % m, dtype)
    fast = leaves(x, base, a, b, router)
    ref = leaves(*(v.double() for v in (x, base, a, b, router)))
    y = moe_lora(*fast, spec, 2.0, backend=backend)
    y_ref = reference_moe_lora(*ref, spec, 2.0)
    dy = torch.randn_like(y_ref)
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    return y, y_ref, fast, ref


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + s[5])
def test_matches_reference_float32(backend, shape):
    y, y_ref, fast, ref = run_both(backend, shape, torch.float32, own=shape[3] - 1)
    tol = TOL[torch.float32]
    assert rel_err(y, y_ref) < tol
    for name, f, r in zip(["x", "base_out", "A", "B", "router"], fast, ref):
        assert f.grad is not None, name
        assert rel_err(f.grad, r.grad) < tol, name


@pytest.mark.parametrize("routing", ["adaptive", "topk", "dense"])
def test_torch_backend_gradcheck_float64(routing):
    x, base, a, b, router, spec = make_inputs(7, 6, 5, 3, 2, routing, 2, 1, torch.float64)
    inputs = leaves(x, base, a, b, router)
    assert torch.autograd.gradcheck(
        lambda *v: moe_lora(*v, spec, 1.5, backend="torch"), inputs, eps=1e-6, atol=1e-7
    )


def test_reference_gradcheck_float64():
    x, base, a, b, router, spec = make_inputs(4, 5, 3, 3, 2, "adaptive", None, 2, torch.float64)
    inputs = leaves(x, base, a, b, router)
    assert torch.autograd.gradcheck(
        lambda *v: reference_moe_lora(*v, spec, 1.5), inputs, eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b in ("torch", "cpp")])
def test_dropout_hits_experts_not_router(backend):
    """With the same RNG state the op's dropout mask is the backend's (aten's for torch, the
    counter-based one for cpp): compare to the reference."""
    x, base, a, b, router, spec = make_inputs(31, 20, 12, 3, 4, "adaptive", None, 0)
    p = 0.3
    torch.manual_seed(123)
    fast = leaves(x, base, a, b, router)
    y = moe_lora(*fast, spec, 2.0, dropout=p, training=True, backend=backend)
    mask = op_dropout_mask(backend, x.shape, p, 123)
    assert (mask == 0).any() and (mask != 0).any()
    ref = leaves(*(v.double() for v in (x, base, a, b, router)))
    y_ref = reference_moe_lora(*ref, spec, 2.0, dropout_mask=mask.double())
    assert rel_err(y, y_ref) < 1e-5
    dy = torch.randn_like(y_ref)
    y.backward(dy.float())
    y_ref.backward(dy)
    for f, r in zip(fast, ref):
        assert rel_err(f.grad, r.grad) < 1e-5
    # eval mode ignores dropout
    y_eval = moe_lora(x, base, a, b, router, spec, 2.0, dropout=p, training=False)
    y_ref_eval = reference_moe_lora(*(v.double() for v in (x, base, a, b, router)), spec, 2.0)
    assert rel_err(y_eval, y_ref_eval) < 1e-5


def test_leading_dims_and_shape_errors():
    x, base, a, b, router, spec = make_inputs(24, 8, 6, 2, 2, seed=0)
    y = moe_lora(x.view(2, 3, 4, 8), base.view(2, 3, 4, 6), a, b, router, spec, 1.0)
    assert y.shape == (2, 3, 4, 6)
    torch.testing.assert_close(y.reshape(24, 6), moe_lora(x, base, a, b, router, spec, 1.0))
    with pytest.raises(ValueError, match=r"router \(2, 8\)"):
        moe_lora(x, base, a, b, router[:2], spec, 1.0)
    with pytest.raises(ValueError, match=r"x \(24, 7\)"):
        moe_lora(x[:, :7], base, a, b, router, spec, 1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tied_and_huge_router_logits(backend):
    """Duplicated router rows give exactly tied slots (lower slot must win, as in the reference);
    a huge router scale gives one-hot softmaxes. Both must stay finite and match."""
    x, base, a, b, router, spec = make_inputs(40, 16, 12, 3, 4, "adaptive", None, 2, seed=11)
    # small integers: every dot product is exact, so tied rows tie in any summation order
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, x.shape, generator=g).float()
    tied = torch.randint(-2, 3, router.shape, generator=g).float() / 4
    tied[1] = tied[0]
    tied[3] = tied[4] = tied[2]
    # With huge logits the non-top probabilities underflow in float32 (exp below 1e-38) but not
    # in float64, so that case is compared with the reference run in float32.
    for r, ref_dtype in ((tied, torch.float64), (router * 1e4, torch.float32)):
        fast = leaves(x, base, a, b, r)
        ref = leaves(*(v.to(ref_dtype) for v in (x, base, a, b, r)))
        y = moe_lora(*fast, spec, 2.0, backend=backend)
        y_ref = reference_moe_lora(*ref, spec, 2.0)
        assert torch.isfinite(y).all()
        assert rel_err(y - base, y_ref - base.to(ref_dtype)) < 1e-5
        y.sum().backward()
        y_ref.sum().backward()
        for f, r_ in zip(fast, ref):
            assert torch.isfinite(f.grad).all()
            assert rel_err(f.grad, r_.grad) < 1e-4
