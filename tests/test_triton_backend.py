"""The fused Triton kernels against the per-token reference.

On a machine without a GPU these run in Triton's interpreter on CPU tensors (small shapes). The
interpreter computes bfloat16 arithmetic wrongly, so under it the kernels upcast every operand to
float32 right after loading; the bfloat16 cases here therefore check storage and routing in
bfloat16, not the GPU's native bfloat16 tensor-core path (run this file on a GPU for that).
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1 (set before import)", allow_module_level=True)
pytest.importorskip("triton")

from fedlease.kernels import launch
from helpers import clients_reference, leaves, make_inputs, rel_err

from fedlease.ops import moe_lora, moe_lora_linear, triton_backend
from fedlease.reference import reference_moe_lora

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SHAPES = [  # tokens, d_in, d_out, experts, rank, routing, top_k
    (37, 24, 40, 3, 4, "adaptive", None),  # M*r = 12
    (65, 48, 32, 5, 8, "adaptive", None),  # M*r = 40, odd tokens > one block
    (7, 16, 20, 1, 4, "adaptive", None),
    (29, 40, 24, 8, 16, "adaptive", None),  # S = 15, M*r = 128
    (33, 32, 48, 7, 4, "adaptive", None),  # M*r = 28
    (51, 24, 36, 4, 8, "topk", 2),
    (19, 20, 28, 3, 16, "dense", None),
    (70, 150, 36, 4, 8, "adaptive", None),  # two token blocks, columns of dx split in two ranges
]
if DEVICE == "cuda":
    SHAPES += [
        (4099, 1024, 768, 4, 8, "adaptive", None),
        (16384, 4096, 4096, 4, 8, "adaptive", None),
    ]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(triton_backend, "POISON_BUFFERS", True)
    monkeypatch.delenv("FEDLEASE_BACKEND", raising=False)


def shape_id(s):
    return "x".join(map(str, s[:5])) + s[5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_and_all_gradients_match_reference(shape, dtype):
    t, d_in, d_out, m, r, routing, k = shape
    x, base, a, b, router, spec = make_inputs(
        t, d_in, d_out, m, r, routing, k, m // 2, dtype, DEVICE
    )
    fast = leaves(x, base, a, b, router)
    ref = leaves(*(v.double().cpu() for v in (x, base, a, b, router)))
    y = moe_lora(*fast, spec, 2.0, backend="triton")
    y_ref = reference_moe_lora(*ref, spec, 2.0) if t < 1000 else None
    if y_ref is None:  # large GPU shapes: the torch backend in float64 stands in for the reference
        y_ref = moe_lora(*ref, spec, 2.0, backend="torch")
    assert torch.isfinite(y).all()
    assert rel_err(y.cpu(), y_ref) < TOL[dtype]
    dy = torch.randn_like(y_ref)
    y.backward(dy.to(dtype).to(DEVICE))
    y_ref.backward(dy)
    for name, f, r_ in zip(["x", "base_out", "A", "B", "router"], fast, ref):
        assert torch.isfinite(f.grad).all(), name
        if m == 1 and name == "router":  # one slot: the router gets exactly zero gradient
            assert torch.all(f.grad == 0) and torch.all(r_.grad == 0)
            continue
        assert rel_err(f.grad.cpu(), r_.grad) < TOL[dtype], name


def test_dropout_mask_from_seed_matches_reference():
    x, base, a, b, router, spec = make_inputs(
        45, 40, 24, 3, 4, "adaptive", None, 1, torch.float32, DEVICE
    )
    p = 0.25
    torch.manual_seed(7)
    fast = leaves(x, base, a, b, router)
    y = moe_lora(*fast, spec, 2.0, dropout=p, training=True, backend="triton")
    torch.manual_seed(7)
    seed = triton_backend._draw_seed()
    mask = triton_backend.dropout_mask(seed, 45, 40, p, DEVICE)
    kept = (mask > 0).double().mean().item()
    assert 0.6 < kept < 0.9 and torch.all(mask[mask > 0] == 1 / (1 - p))
    ref = leaves(*(v.double().cpu() for v in (x, base, a, b, router)))
    y_ref = reference_moe_lora(*ref, spec, 2.0, dropout_mask=mask.double().cpu())
    assert rel_err(y.cpu(), y_ref) < 1e-5
    dy = torch.randn_like(y_ref)
    y.backward(dy.float().to(DEVICE))
    y_ref.backward(dy)
    for f, r_ in zip(fast, ref):
        assert rel_err(f.grad.cpu(), r_.grad) < 1e-5


def test_layer_uses_triton_through_env(monkeypatch):
    from torch import nn

    from fedlease import MoELoRALinear

    layer = MoELoRALinear(nn.Linear(24, 20), 3, 4, own_expert=2).to(DEVICE)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 11, 24, device=DEVICE)
    want = layer(x)  # auto: torch on CPU
    monkeypatch.setenv("FEDLEASE_BACKEND", "triton")
    got = layer(x)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("base_first", [False, True], ids=["lora_first", "base_first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[-1]], ids=shape_id)
def test_linear_op_matches_reference(shape, dtype, with_bias, base_first, monkeypatch):
    """The layer with its base GEMM inside the op, in both orders (expand written first and the
    base GEMM accumulated onto it, LoRA dx likewise; or the base GEMMs first and the kernels
    adding onto their outputs), every gradient included."""
    monkeypatch.setattr(triton_backend, "BASE_GEMM_FIRST", base_first)
    t, d_in, d_out, m, r, routing, k = shape
    x, _, a, b, router, spec = make_inputs(t, d_in, d_out, m, r, routing, k, m - 1, dtype, DEVICE)
    w = (torch.randn(d_out, d_in) * d_in**-0.5).to(dtype=dtype, device=DEVICE)
    bias = torch.randn(d_out).to(dtype=dtype, device=DEVICE) if with_bias else None
    tensors = [x, w, bias, a, b, router]
    fast = [None if v is None else v.detach().clone().requires_grad_(True) for v in tensors]
    ref = [None if v is None else v.detach().double().cpu().requires_grad_(True) for v in tensors]
    y = moe_lora_linear(*fast, spec, 2.0, backend="triton")
    base_ref = ref[0] @ ref[1].t() + (ref[2] if with_bias else 0)
    y_ref = reference_moe_lora(ref[0], base_ref, *ref[3:], spec, 2.0)
    assert y.dtype == dtype and rel_err(y.cpu(), y_ref) < TOL[dtype]
    dy = torch.randn_like(y_ref)
    y.backward(dy.to(dtype).to(DEVICE))
    y_ref.backward(dy)
    for name, f, r_ in zip(["x", "weight", "bias", "A", "B", "router"], fast, ref):
        if f is None:
            continue
        assert torch.isfinite(f.grad).all(), name
        assert rel_err(f.grad.cpu(), r_.grad) < TOL[dtype], name


@pytest.mark.parametrize("op", ["moe_lora", "moe_lora_linear", "moe_lora_linear_base_first"])
def test_dropout_on_many_experts_matches_reference(op, monkeypatch):
    """Dropout with M = 8, r = 16 (two row blocks of the weight-gradient pass) and several token
    splits: the experts see the seeded mask, the router and the base do not."""
    monkeypatch.setattr(triton_backend, "BASE_GEMM_FIRST", op.endswith("base_first"))
    op = op.removesuffix("_base_first")
    t, d_in, d_out, m, r = 133, 72, 40, 8, 16
    x, base, a, b, router, spec = make_inputs(t, d_in, d_out, m, r, "adaptive", None, 5,
                                              torch.float32, DEVICE)  # fmt: skip
    w = torch.randn(d_out, d_in, device=DEVICE) * d_in**-0.5
    p = 0.2
    torch.manual_seed(11)
    if op == "moe_lora":
        fast = leaves(x, base, a, b, router)
        y = moe_lora(*fast, spec, 2.0, dropout=p, training=True, backend="triton")
    else:
        fast = leaves(x, a, b, router)
        y = moe_lora_linear(fast[0], w, None, *fast[1:], spec, 2.0, dropout=p, training=True,
                            backend="triton")  # fmt: skip
        base = x @ w.t()
    torch.manual_seed(11)
    mask = triton_backend.dropout_mask(triton_backend._draw_seed(), t, d_in, p, DEVICE)
    ref_all = leaves(*(v.double().cpu() for v in (x, base, a, b, router)))
    y_ref = reference_moe_lora(*ref_all, spec, 2.0, dropout_mask=mask.double().cpu())
    if op == "moe_lora_linear":  # the base's x gradient: dy W, added by hand
        ref = [ref_all[0], *ref_all[2:]]
    else:
        ref = ref_all
    assert rel_err(y.cpu(), y_ref) < 1e-5
    dy = torch.randn_like(y_ref)
    y.backward(dy.float().to(DEVICE))
    y_ref.backward(dy)
    if op == "moe_lora_linear":
        ref[0].grad = ref[0].grad + dy @ w.double().cpu()
    for f, r_ in zip(fast, ref):
        assert rel_err(f.grad.cpu(), r_.grad) < 1e-5


def test_launch_plans_cover_splits_column_ranges_and_row_blocks():
    """The shapes above reach every partitioning path of the backward under the interpreter,
    and GPU plans keep the weight-gradient accumulator at 128 x 128 float32 or less."""
    assert launch.backward_plan(65, 48, 9, 5 * 8, interpreter=True).splits == 2
    assert launch.backward_plan(70, 150, 7, 4 * 8, interpreter=True).cols_per_program < 150
    plan = launch.backward_plan(29, 40, 15, 8 * 16, interpreter=True)
    assert launch.cdiv(15 + 8 * 16, plan.meta["grad_weights"]["BLOCK_K"]) == 2  # two row blocks
    for s, mr in ((7, 4 * 8), (15, 8 * 8), (15, 8 * 16)):
        for tokens, d in ((16384, 4096), (8192, 384), (7, 1024)):
            plan = launch.backward_plan(tokens, d, s, mr, interpreter=False)
            w = plan.meta["grad_weights"]
            assert w["BLOCK_K"] * w["BLOCK_D"] <= 128 * 128
            assert plan.splits * plan.tokens_per_split >= tokens
            assert (plan.splits - 1) * plan.tokens_per_split < tokens  # no empty split
            assert plan.cols_per_program % plan.meta["grad_input"]["BLOCK_D"] == 0


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU every test above runs the GPU plans")
@pytest.mark.parametrize("op", ["moe_lora_linear", "moe_lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_gpu_launch_plans_compute_the_same_under_the_interpreter(dtype, op, monkeypatch):
    """The block sizes, column ranges and token splits a GPU launches with (float32's own plans
    included: 8 warps, 32-column expand blocks at M*r = 128), run by the interpreter: the layer op
    (bias in the expand) and the plain op (base output in the expand) at M = 8, r = 16 with
    dropout against the reference, every gradient. (Only the plans are the GPU's: bf16 operands
    are still upcast after loading, as the interpreter needs.)"""
    gpu_forward, gpu_backward = launch.forward_plan, launch.backward_plan

    def forward_plan(slots, mr, interpreter, wide):
        return gpu_forward(slots, mr, False, wide)

    def backward_plan(tokens, d, slots, mr, interpreter, wide, clients=1):
        return gpu_backward(tokens, d, slots, mr, False, wide, clients)

    monkeypatch.setattr(launch, "forward_plan", forward_plan)
    monkeypatch.setattr(launch, "backward_plan", backward_plan)
    t, d_in, d_out, m, r = 70, 96, 80, 8, 16
    plan = launch.forward_plan(2 * m - 1, m * r, False, dtype == torch.float32)
    assert plan.meta["expand"]["BLOCK_N"] == (32 if dtype == torch.float32 else 128)
    x, base, a, b, router, spec = make_inputs(t, d_in, d_out, m, r, "adaptive", None, 3, dtype,
                                              DEVICE)  # fmt: skip
    if op == "moe_lora_linear":  # the base's weight and bias: its output is built in the graph
        w = (torch.randn(d_out, d_in) * d_in**-0.5).to(dtype)
        inputs = (x, w, torch.randn(d_out).to(dtype), a, b, router)
    else:
        inputs = (x, base, a, b, router)
    fast = [v.detach().clone().requires_grad_(True) for v in inputs]
    ref = [v.detach().double().requires_grad_(True) for v in inputs]
    torch.manual_seed(5)
    call = moe_lora_linear if op == "moe_lora_linear" else moe_lora
    y = call(*fast, spec, 2.0, dropout=0.2, training=True, backend="triton")
    torch.manual_seed(5)
    mask = triton_backend.dropout_mask(triton_backend._draw_seed(), t, d_in, 0.2, DEVICE)
    base_ref = ref[0] @ ref[1].t() + ref[2] if op == "moe_lora_linear" else ref[1]
    adapters = ref[3:] if op == "moe_lora_linear" else ref[2:]
    y_ref = reference_moe_lora(ref[0], base_ref, *adapters, spec, 2.0,
                               dropout_mask=mask.double())  # fmt: skip
    assert rel_err(y, y_ref) < TOL[dtype]
    dy = torch.randn_like(y_ref)
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    for i, (f, r_) in enumerate(zip(fast, ref)):
        assert rel_err(f.grad, r_.grad) < TOL[dtype], i


CLIENT_SHAPES = [(3, 37, 40, 24, 4, 4)]  # clients, tokens each, in, out, experts, rank
if DEVICE == "cuda":  # lockstep shapes: MiniLM's layers at 16 clients, a wider layer at 64
    CLIENT_SHAPES += [(16, 512, 384, 384, 4, 4), (64, 128, 1024, 1024, 4, 8)]


def _clients_reference(x, w, bias, a, b, router, specs, scaling, masks):
    """Each client's layer in float64: the per-token reference for small inputs, the ``torch``
    op (itself checked against it, gradcheck included) with the same dropout masks for large."""
    from fedlease.ops.dispatch import concat_adapters
    from fedlease.ops.torch_backend import moe_lora_torch

    base = x @ w.t() + bias
    if x.shape[0] * x.shape[1] < 1000:
        return clients_reference(x, base, a, b, router, specs, scaling, masks)
    a_cat, b_cat = concat_adapters(a, b)
    fold = torch.stack([s.fold_matrix(x.device) for s in specs])
    return moe_lora_torch(x, x * masks, base, a_cat, b_cat, router, fold, specs[0], scaling)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", CLIENT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_clients_in_one_call_match_each_client_alone(shape, dtype):
    """The layer op on client-stacked tensors (adaptive routing, own experts differing between
    clients, bias, dropout 0.1), one launch of each kernel for all clients, on this device's
    launch plans: output and every gradient against each client's float64 layer with the mask
    the kernels drew (keyed by the row among all clients' rows)."""
    from fedlease.routing import RoutingSpec

    n, t, d_in, d_out, m, r = shape
    g = torch.Generator().manual_seed(n * t)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype=dtype, device=DEVICE)

    specs = tuple(RoutingSpec.make("adaptive", m, None, i % m) for i in range(n))
    x = rnd(n, t, d_in)
    a, b = rnd(n, m, r, d_in, scale=d_in**-0.5), rnd(n, m, d_out, r, scale=r**-0.5)
    router = rnd(n, 2 * m - 1, d_in, scale=3 * d_in**-0.5)
    w, bias = rnd(d_out, d_in, scale=d_in**-0.5), rnd(d_out)
    fast = leaves(x, a, b, router)
    torch.manual_seed(9)
    y = moe_lora_linear(fast[0], w, bias, *fast[1:], specs, 2.0, dropout=0.1, training=True,
                        backend="triton")  # fmt: skip
    torch.manual_seed(9)
    seed = triton_backend._draw_seed()
    masks = triton_backend.dropout_mask(seed, n * t, d_in, 0.1, DEVICE).view(n, t, d_in)
    ref = leaves(*(v.double() for v in (x, a, b, router)))
    y_ref = _clients_reference(ref[0], w.double(), bias.double(), *ref[1:], specs, 2.0,
                               masks.double())  # fmt: skip
    assert rel_err(y, y_ref) < TOL[dtype]
    dy = torch.randn(y_ref.shape, generator=g).to(DEVICE)
    y.backward(dy.to(dtype))
    y_ref.backward(dy.double())
    for name, f, r_ in zip(["x", "A", "B", "router"], fast, ref):
        assert rel_err(f.grad, r_.grad) < TOL[dtype], name
