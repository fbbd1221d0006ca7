"""The compiled kernels (``fedlease._C``): built, correct in float32/bfloat16, traceable; the
CUDA routing kernels where the install had a CUDA torch and nvcc."""

import os

import pytest
import torch
from helpers import leaves, make_inputs, rel_err

from fedlease.ops import available_backends, moe_lora, moe_lora_linear
from fedlease.ops.dispatch import unavailable_reason
from fedlease.reference import reference_moe_lora

BUILT = "cpp" in available_backends("cpu")
needs_ext = pytest.mark.skipif(not BUILT, reason="fedlease._C not built (FEDLEASE_NO_EXT=1?)")


@pytest.mark.skipif(os.environ.get("FEDLEASE_NO_EXT") == "1", reason="build skipped on purpose")
def test_extension_was_built():
    """CI installs with the extension: it must have been compiled, not silently skipped."""
    import fedlease._C as ext

    assert ext.openmp, "fedlease._C was compiled without OpenMP"
    for op in ("moe_lora_fwd", "moe_lora_bwd", "moe_lora_linear_fwd", "moe_lora_linear_bwd",
               "moe_lora_linear", "philox_dropout", "apply_keep_mask",
               "softmax_dropout"):  # fmt: skip
        assert hasattr(torch.ops.fedlease, op), op
    assert BUILT


SHAPES = [  # tokens, d_in, d_out, experts, rank, routing, top_k
    (53, 40, 24, 3, 4, "adaptive", None),
    (130, 64, 96, 8, 8, "adaptive", None),
    (9, 16, 16, 1, 16, "adaptive", None),
    (77, 48, 40, 5, 8, "topk", 3),
    (31, 24, 56, 4, 4, "dense", None),
]


@needs_ext
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + s[5])
def test_matches_reference(shape, dtype, tol):
    _compare_with_reference(shape, dtype, tol, "cpu")


def _compare_with_reference(shape, dtype, tol, device):
    """Forward and every gradient of the cpp op against the float64 reference (on CPU)."""
    t, d_in, d_out, m, r, routing, k = shape
    x, base, a, b, router, spec = make_inputs(
        t, d_in, d_out, m, r, routing, k, m - 1, dtype, device
    )
    fast = leaves(x, base, a, b, router)
    ref = leaves(*(v.double().cpu() for v in (x, base, a, b, router)))
    y = moe_lora(*fast, spec, 2.0, backend="cpp")
    y_ref = reference_moe_lora(*ref, spec, 2.0)
    delta, delta_ref = y.double().cpu() - base.double().cpu(), y_ref - base.double().cpu()
    assert rel_err(delta, delta_ref) < tol  # the LoRA update itself, not drowned by base_out
    dy = torch.randn_like(y_ref)
    y.backward(dy.to(dtype=dtype, device=device))
    y_ref.backward(dy)
    for name, f, r_ in zip(["x", "base_out", "A", "B", "router"], fast, ref):
        if m == 1 and name == "router":
            assert torch.all(f.grad == 0)
            continue
        assert rel_err(f.grad.cpu(), r_.grad) < tol, name


@needs_ext
def test_gradcheck_float64():
    x, base, a, b, router, spec = make_inputs(6, 5, 4, 3, 2, "adaptive", None, 2, torch.float64)
    assert torch.autograd.gradcheck(
        lambda *v: moe_lora(*v, spec, 1.5, backend="cpp"), leaves(x, base, a, b, router),
        eps=1e-6, atol=1e-7,
    )  # fmt: skip


@needs_ext
def test_linear_gradcheck_float64():
    """The fused layer op (base GEMM inside, blocked over tokens: 130 tokens = two blocks)."""
    x, _, a, b, router, spec = make_inputs(130, 5, 4, 3, 2, "adaptive", None, 2, torch.float64)
    w, bias = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *v: moe_lora_linear(*v, spec, 1.5, backend="cpp"),
        leaves(x, w, bias, a, b, router), eps=1e-6, atol=1e-7,
    )  # fmt: skip


@needs_ext
def test_linear_op_opcheck_and_torch_compile():
    x, _, a, b, router, spec = make_inputs(150, 16, 12, 3, 4, seed=2)
    w, bias = torch.randn(12, 16), torch.randn(12)
    a_cat, b_cat = a.reshape(1, 12, 16), b.permute(1, 0, 2).reshape(1, 12, 12)
    for p, seed in ((0.0, 0), (0.3, 12345)):  # without dropout, and with a mask drawn inside
        args = (x, None, w, bias, router[None], a_cat, b_cat, 3, [0], [], 3, 2.0, p, seed)
        torch.library.opcheck(torch.ops.fedlease.moe_lora_linear_fwd.default, args)
        # the differentiable layer op (autograd in C++), in x's dtype and cast to bfloat16
        for dtype in (None, torch.bfloat16):
            layer_args = (*leaves(x), None, w, bias, *leaves(router, a, b), 3, [0], 3, 2.0, p,
                          seed, [], dtype)  # fmt: skip
            torch.library.opcheck(torch.ops.fedlease.moe_lora_linear.default, layer_args)
        # three clients' stacked tensors, their tokens in unequal shares
        stacked = [t[None].repeat(3, *[1] * t.dim()) for t in (router, a, b)]
        layer_args = (*leaves(x), None, w, bias, *leaves(*stacked), 3, [0, 2, 1], 3, 2.0, p,
                      seed, [40, 0, 110], None)  # fmt: skip
        torch.library.opcheck(torch.ops.fedlease.moe_lora_linear.default, layer_args)
    torch.library.opcheck(torch.ops.fedlease.philox_dropout.default, (leaves(x)[0], 0.3, 99))
    scores, mask = torch.randn(2, 3, 5, 40), torch.zeros(2, 1, 5, 40)
    torch.library.opcheck(torch.ops.fedlease.softmax_dropout.default,
                          (leaves(scores)[0], mask, 0.5, 0.3, 7))  # fmt: skip
    fn = torch.compile(lambda *v: moe_lora_linear(*v, spec, 2.0, backend="cpp"), fullgraph=True)
    got, want = leaves(x, a, b, router), leaves(x, a, b, router)
    y = fn(got[0], w, bias, *got[1:])
    y.sum().backward()
    y_want = moe_lora_linear(want[0], w, bias, *want[1:], spec, 2.0, backend="torch")
    y_want.sum().backward()
    assert rel_err(y, y_want) < 1e-5
    for g, t in zip(got, want):
        assert rel_err(g.grad, t.grad) < 1e-5


@needs_ext
def test_fake_tensor_and_torch_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, base, a, b, router, spec = make_inputs(20, 16, 12, 3, 4, seed=1)
    a_cat, b_cat = a.reshape(12, 16), b.permute(1, 0, 2).reshape(12, 12)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        out = torch.ops.fedlease.moe_lora_fwd(
            fx, None, mode.from_tensor(router), mode.from_tensor(a_cat),
            mode.from_tensor(b_cat), mode.from_tensor(base),
            3, 0, 3, 2.0,
        )  # fmt: skip
        assert [tuple(o.shape) for o in out] == [(20, 12), (20, 5), (20, 12), (20, 12)]
    args = (x, None, router, a_cat, b_cat, base, 3, 0, 3, 2.0)
    torch.library.opcheck(torch.ops.fedlease.moe_lora_fwd.default, args)
    fn = torch.compile(lambda *v: moe_lora(*v, spec, 2.0, backend="cpp"), fullgraph=True)
    inputs = leaves(x, base, a, b, router)
    y = fn(*inputs)
    y.sum().backward()
    want = leaves(x, base, a, b, router)
    moe_lora(*want, spec, 2.0, backend="torch").sum().backward()
    assert rel_err(y, moe_lora(x, base, a, b, router, spec, 2.0, backend="torch")) < 1e-5
    for g, w in zip(inputs, want):
        assert rel_err(g.grad, w.grad) < 1e-5


@needs_ext
def test_cuda_kernels_are_built_exactly_when_torch_and_nvcc_allow():
    """setup.py's rule: CUDA routing kernels with a CUDA torch and a CUDA toolkit, else none
    (a CPU torch beside an installed nvcc must build the CPU extension cleanly)."""
    import fedlease._C as ext
    from torch.utils.cpp_extension import CUDA_HOME

    wanted = torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("FEDLEASE_NO_CUDA") == "1":
        wanted = False
    assert ext.cuda == wanted
    reason = unavailable_reason("cpp", torch.device("cuda"))
    if ext.cuda:
        assert reason is None
    else:
        assert "built without its CUDA routing kernels" in reason


CUDA_BUILT = BUILT and torch.cuda.is_available() and "cpp" in available_backends("cuda")


@pytest.mark.skipif(not CUDA_BUILT, reason="needs a GPU and fedlease._C built with CUDA")
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 1e-2)], ids=str
)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + s[5])
def test_cuda_routing_matches_reference(shape, dtype, tol):
    _compare_with_reference(shape, dtype, tol, "cuda")


@pytest.mark.skipif(not CUDA_BUILT, reason="needs a GPU and fedlease._C built with CUDA")
def test_cuda_layer_uses_the_routing_op():
    """On CUDA the cpp layer is F.linear + the routing op (the fused layer op is CPU-only)."""
    from fedlease import MoELoRALinear

    base = torch.nn.Linear(48, 40).cuda()
    layers = [MoELoRALinear(base, 3, 4, own_expert=1, backend=b) for b in ("cpp", "torch")]
    torch.nn.init.normal_(layers[0].lora_B)
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(3, 70, 48, device="cuda")
    assert rel_err(layers[0](x), layers[1](x)) < 1e-5
