"""``moe_lora_linear``: the layer with its base GEMM inside the op (fused, blocked over tokens, by
the ``cpp`` backend) against the per-token reference on ``x W^T + b``, forward and backward."""

import pytest
import torch
from helpers import assert_fwd_bwd_close, leaves, make_inputs, op_dropout_mask, rel_err

from fedlease import MoELoRALinear
from fedlease.ops import available_backends, moe_lora_linear
from fedlease.reference import reference_moe_lora

BACKENDS = [b for b in available_backends("cpu") if b in ("torch", "cpp")]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

SHAPES = [  # tokens, d_in, d_out, experts, rank, routing, top_k; the cpp op blocks 128 tokens
    (53, 40, 24, 3, 4, "adaptive", None),
    (300, 64, 96, 8, 8, "adaptive", None),  # three blocks, the last one partial
    (129, 16, 16, 1, 16, "adaptive", None),
    (77, 48, 40, 5, 8, "topk", 3),
    (256, 24, 56, 4, 4, "dense", None),
]


def linear_inputs(shape, dtype, seed=None):
    t, d_in, d_out, m, r, routing, k = shape
    x, _, a, b, router, spec = make_inputs(t, d_in, d_out, m, r, routing, k, m - 1, dtype,
                                           seed=seed)  # fmt: skip
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    weight = (torch.randn(d_out, d_in, generator=g) * d_in**-0.5).to(dtype)
    bias = torch.randn(d_out, generator=g).to(dtype)
    return x, weight, bias, a, b, router, spec


def reference_linear(x, weight, bias, a, b, router, spec, scaling, mask=None):
    base = x @ weight.t() + (bias if bias is not None else 0)
    return reference_moe_lora(x, base, a, b, router, spec, scaling, dropout_mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + s[5])
def test_matches_reference(backend, dtype, with_bias, shape):
    """Output and the gradients of x, A, B, router, and of weight and bias too (a base left
    trainable must still learn), against the float64 reference."""
    x, w, bias, a, b, router, spec = linear_inputs(shape, dtype)
    bias = bias if with_bias else None
    tensors = [x, w, bias, a, b, router]
    fast = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    ref = [None if t is None else t.detach().double().requires_grad_(True) for t in tensors]
    y = moe_lora_linear(*fast, spec, 2.0, backend=backend)
    y_ref = reference_linear(*ref, spec, 2.0)
    tol = TOL[dtype]
    assert y.dtype == dtype and rel_err(y, y_ref) < tol
    dy = torch.randn_like(y_ref)
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    for name, f, r in zip(["x", "weight", "bias", "A", "B", "router"], fast, ref):
        if f is None or (name == "router" and spec.num_experts == 1):
            continue  # one expert: the router gets no gradient (the fold is constant)
        assert rel_err(f.grad, r.grad) < tol, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_base_gets_no_gradient(backend):
    x, w, bias, a, b, router, spec = linear_inputs(SHAPES[1], torch.float32, seed=4)
    xa, aa, ba, ra = leaves(x, a, b, router)
    moe_lora_linear(xa, w, bias, aa, ba, ra, spec, 2.0, backend=backend).sum().backward()
    assert w.grad is None and bias.grad is None
    assert all(t.grad is not None for t in (xa, aa, ba, ra))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_input_without_grad_leaves_the_other_gradients_alone(backend, p):
    """A first layer's input needs no gradient: none is made, and A, B and the router get the
    same gradients as when x has one (with dropout too, whose mask the backward draws again)."""
    x, w, bias, a, b, router, spec = linear_inputs(SHAPES[1], torch.float32, seed=5)
    grads = []
    for x_grad in (True, False):
        xs, aa, ba, ra = leaves(x, a, b, router)
        xs.requires_grad_(x_grad)
        torch.manual_seed(11)
        y = moe_lora_linear(xs, w, bias, aa, ba, ra, spec, 2.0, dropout=p, training=True,
                            backend=backend)  # fmt: skip
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
        assert (xs.grad is not None) == x_grad
        grads.append([t.grad for t in (aa, ba, ra)])
    for with_x, without_x in zip(*grads):
        assert torch.equal(with_x, without_x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_hits_experts_only(backend):
    """The experts see dropout(x), base and router x; the backward applies the forward's mask
    (the cpp op draws it inside, twice: a mask regenerated wrongly fails the gradients)."""
    x, w, bias, a, b, router, spec = linear_inputs(SHAPES[1], torch.float32)
    p = 0.3
    torch.manual_seed(7)
    fast = leaves(x, w, bias, a, b, router)
    y = moe_lora_linear(*fast, spec, 2.0, dropout=p, training=True, backend=backend)
    mask = op_dropout_mask(backend, x.shape, p, 7).double()
    assert (mask == 0).any() and (mask != 0).any()
    ref = leaves(*(v.double() for v in (x, w, bias, a, b, router)))
    y_ref = reference_linear(*ref, spec, 2.0, mask=mask)
    assert_fwd_bwd_close(y, y_ref, fast, ref, ["x", "weight", "bias", "A", "B", "router"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_equals_base_plus_op(backend):
    """``MoELoRALinear`` (which calls moe_lora_linear) keeps leading dimensions and equals its
    base linear plus the reference update."""
    base = torch.nn.Linear(24, 20)
    layer = MoELoRALinear(base, 3, 4, alpha=8, own_expert=2, backend=backend)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 70, 24)
    params = (layer.lora_A, layer.lora_B, layer.router)
    want = reference_moe_lora(
        x.double(), base(x).double(), *(p.double() for p in params), layer.spec, 2.0
    )
    assert rel_err(layer(x), want) < 1e-5


def test_shape_errors_name_the_tensors():
    x, w, bias, a, b, router, spec = linear_inputs(SHAPES[0], torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"base weight \(24, 39\)"):
        moe_lora_linear(x, w[:, :39], bias, a, b, router, spec, 1.0)
    with pytest.raises(ValueError, match=r"bias \(23,\)"):
        moe_lora_linear(x, w, bias[:23], a, b, router, spec, 1.0)
