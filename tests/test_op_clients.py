"""The op with a client dimension: N clients' stacked adapters and routers, each token routed over
its own client's experts only, against the float64 reference per client, forward and backward,
in every routing mode, with and without dropout, for every CPU backend."""

import pytest
import torch
from helpers import assert_fwd_bwd_close, clients_reference, leaves, op_dropout_mask, rel_err

from fedlease.ops import available_backends, moe_lora, moe_lora_linear
from fedlease.routing import RoutingSpec

BACKENDS = [b for b in available_backends("cpu") if b in ("torch", "cpp", "triton")]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
CASES = [  # clients, tokens per client, in, out, experts, rank, routing, top_k
    (3, 37, 24, 16, 3, 4, "adaptive", None),  # odd token count
    (2, 70, 16, 24, 4, 2, "topk", 2),
    (4, 9, 20, 12, 2, 4, "dense", None),
    (1, 33, 16, 16, 3, 2, "adaptive", None),  # N = 1
]


def client_inputs(case, dtype, seed):
    n, t, d_in, d_out, m, r, routing, k = case
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    specs = tuple(RoutingSpec.make(routing, m, k, own_expert=i % m) for i in range(n))
    x, base = rnd(n, t, d_in), rnd(n, t, d_out)
    a, b = rnd(n, m, r, d_in, scale=d_in**-0.5), rnd(n, m, d_out, r, scale=r**-0.5)
    router = rnd(n, specs[0].num_slots, d_in, scale=3 * d_in**-0.5)
    weight, bias = rnd(d_out, d_in, scale=d_in**-0.5), rnd(d_out)
    return x, base, a, b, router, weight, bias, specs


def _name(case):
    return f"N{case[0]}x{case[1]}-{case[6]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_each_client_matches_its_reference(backend, case, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and case[0] > 2:
        pytest.skip("the interpreter is slow: fp32 and two clients are enough for its loop")
    x, base, a, b, router, _, _, specs = client_inputs(case, dtype, seed=case[1])
    fast = leaves(x, base, a, b, router)
    ref = leaves(*(v.double() for v in (x, base, a, b, router)))
    y = moe_lora(*fast, specs, 2.0, backend=backend)
    y_ref = clients_reference(*ref, specs, 2.0)
    assert y.shape == x.shape[:-1] + (base.shape[-1],) and rel_err(y, y_ref) < TOL[dtype]
    dy = torch.randn_like(y_ref)
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    for name, f, r in zip(["x", "base", "A", "B", "router"], fast, ref):
        if name == "router" and case[4] == 1:
            continue
        assert rel_err(f.grad, r.grad) < TOL[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_layer_op_shares_the_base_and_drops_per_client(backend, case, dtype):
    """moe_lora_linear: one frozen base for every client; with dropout, each client's experts
    see its own mask (the backend's: aten's for torch; for cpp and triton one seed's mask over
    every client's rows, drawn inside the op)."""
    if backend == "triton" and (dtype == torch.bfloat16 or case[0] > 2):
        pytest.skip("the interpreter is slow: fp32 and two clients are enough for its loop")
    x, _, a, b, router, w, bias, specs = client_inputs(case, dtype, seed=5)
    n, t, d_in = x.shape
    p = 0.3
    torch.manual_seed(21)
    fast = leaves(x, w, bias, a, b, router)
    y = moe_lora_linear(*fast, specs, 2.0, dropout=p, training=True, backend=backend)
    if backend == "torch":  # one draw over every client's tokens
        masks = op_dropout_mask("torch", x.shape, p, 21)
    else:  # keyed by the row among every client's rows
        masks = op_dropout_mask(backend, (n * t, d_in), p, 21).reshape(n, t, d_in)
    ref = leaves(*(v.double() for v in (x, w, bias, a, b, router)))
    base = ref[0] @ ref[1].t() + ref[2]
    y_ref = clients_reference(ref[0], base, *ref[3:], specs, 2.0, masks.double())
    names = ["x", "weight", "bias", "A", "B", "router"]
    assert_fwd_bwd_close(y, y_ref, fast, ref, names, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shares", [(40, 0, 71), (5, 90, 16)], ids=str)
def test_the_layer_op_takes_unequal_token_shares(backend, shares):
    """moe_lora_linear with ``shares``: x holds each client's tokens in turn in these counts (an
    empty share too, as a packed batch can give); each client against its float64 reference,
    forward and every gradient; with dropout for cpp (one seed's mask over all rows)."""
    t, n = sum(shares), len(shares)
    x, _, a, b, router, w, bias, specs = client_inputs((n, t, 16, 12, 3, 2, "adaptive", None),
                                                       torch.float32, seed=8)  # fmt: skip
    x = x[0]  # (t, in): every client's rows
    p = 0.3 if backend == "cpp" else 0.0
    fast = leaves(x, w, bias, a, b, router)
    torch.manual_seed(0)
    y = moe_lora_linear(*fast, specs, 2.0, dropout=p, training=True, backend=backend,
                        shares=shares)  # fmt: skip
    mask = op_dropout_mask(backend, (t, 16), p, 0) if p else torch.ones(t, 16)
    ref = leaves(*(v.double() for v in (x, w, bias, a, b, router)))
    parts = zip(ref[0].split(shares), mask.double().split(shares), ref[3], ref[4], ref[5], specs)
    y_ref = torch.cat([
        clients_reference(xi[None], (xi @ ref[1].t() + ref[2])[None], ai[None], bi[None],
                          ri[None], (s,), 2.0, mi[None])[0]
        for xi, mi, ai, bi, ri, s in parts if len(xi)  # (the reference wants a token)
    ])  # fmt: skip
    assert_fwd_bwd_close(y, y_ref, fast, ref, ["x", "weight", "bias", "A", "B", "router"])


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the compiled extension")
def test_cpp_runs_all_clients_in_one_call(monkeypatch):
    """cpp's layer op takes every client at once (equal or unequal shares): one call of the
    compiled op for three clients; inside ``dispatch.once_per_client`` one per client."""
    from fedlease.ops import cpp_backend, dispatch

    calls = []
    real = cpp_backend._layer_op

    def counted(x, *args):
        calls.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(cpp_backend, "_layer_op", counted)
    x, _, a, b, router, w, bias, specs = client_inputs(CASES[0], torch.float32, seed=4)
    x, a, b, router = leaves(x, a, b, router)
    moe_lora_linear(x, w, bias, a, b, router, specs, 2.0, backend="cpp").sum().backward()
    flat = x.reshape(-1, x.shape[-1])
    moe_lora_linear(flat, w, bias, a, b, router, specs, 2.0, backend="cpp", shares=(50, 1, 60))
    assert calls == [111, 111]
    calls.clear()
    with dispatch.once_per_client("cpp"):
        moe_lora_linear(x, w, bias, a, b, router, specs, 2.0, backend="cpp")
    assert calls == [37, 37, 37]


def test_token_share_errors_name_the_shares():
    x, _, a, b, router, w, bias, specs = client_inputs(CASES[0], torch.float32, seed=0)
    flat = x.reshape(-1, x.shape[-1])
    with pytest.raises(ValueError, match=r"token shares \[50, 50, 50\] do not split x's 111"):
        moe_lora_linear(flat, w, bias, a, b, router, specs, 1.0, shares=(50, 50, 50))
    with pytest.raises(ValueError, match="token shares need client-stacked adapters"):
        moe_lora_linear(flat, w, bias, a[0], b[0], router[0], specs[0], 1.0, shares=(111,))
    with pytest.raises(ValueError, match="client dimension mismatch"):
        moe_lora_linear(flat, w, bias, a, b, router, specs, 1.0, shares=(100, 11))


CLIENT_FORMS = BACKENDS  # every CPU backend has one (cpp's in its layer op)


@pytest.mark.parametrize("backend", CLIENT_FORMS)
def test_one_client_is_the_single_client_op(backend):
    """N = 1 through the client form gives the single-client op's numbers exactly, forward and
    every gradient (both run the same code); for cpp and triton with dropout too (same seed, same
    mask: a token's mask is keyed by its row among all clients' rows)."""
    x, base, a, b, router, w, bias, specs = client_inputs(CASES[3], torch.float32, seed=2)
    p = 0.0 if backend == "torch" else 0.25
    runs = []
    for client_form in (False, True):
        tensors = leaves(*(v if client_form else v[0] for v in (x, base, a, b, router)))
        torch.manual_seed(3)
        spec = specs if client_form else specs[0]
        if backend == "cpp":  # its client form is the layer op's
            y = moe_lora_linear(tensors[0], w, bias, *tensors[2:], spec, 2.0, dropout=p,
                                training=True, backend=backend)  # fmt: skip
        else:
            y = moe_lora(*tensors, spec, 2.0, dropout=p, training=True, backend=backend)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        runs.append([v.flatten() for v in (y, *(t.grad for t in tensors)) if v is not None])
    for single, client in zip(*runs, strict=True):
        assert torch.equal(single, client)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend")
def test_triton_launches_each_kernel_once_for_all_clients(monkeypatch):
    """The client dimension is inside the kernels: a forward and backward of the layer op launches
    the same five kernels for three clients as for one, with one base GEMM over all tokens."""
    from fedlease.ops import triton_backend

    launched = []
    real = triton_backend._launch

    def counted(kernel, grid, *args, **meta):
        launched.append((kernel.fn.__name__, grid[-1]))
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(triton_backend, "_launch", counted)
    x, _, a, b, router, w, bias, specs = client_inputs(CASES[0], torch.float32, seed=4)
    for n in (1, 3):
        launched.clear()
        fast = leaves(x[:n], a[:n], b[:n], router[:n])
        y = moe_lora_linear(fast[0], w, bias, *fast[1:], specs[:n], 2.0, backend="triton")
        y.sum().backward()
        names = [name for name, _ in launched]
        assert names == ["shrink_route_kernel", "expand_kernel", "grad_route_kernel",
                         "grad_input_kernel", "grad_weights_kernel"], names  # fmt: skip
        assert [clients for _, clients in launched[:4]] == [n] * 4  # the grids' client axis


def test_once_per_client_runs_a_client_form_as_a_loop(monkeypatch):
    """``dispatch.once_per_client`` (for benchmarks): inside it a backend's client-stacked call
    runs its op once per client on that client's tensors, outside it once for all; the same
    numbers either way."""
    from fedlease.ops import dispatch

    impl, calls = dispatch._REGISTRY["torch"], []

    def recorded(x, *args):
        calls.append(x.dim())
        return impl.fn(x, *args)

    recording = dispatch.Backend(**{**impl.__dict__, "fn": recorded})
    monkeypatch.setitem(dispatch._REGISTRY, "torch", recording)
    x, base, a, b, router, _, _, specs = client_inputs(CASES[0], torch.float32, seed=6)
    with dispatch.once_per_client("torch"):
        looped = moe_lora(x, base, a, b, router, specs, 2.0, backend="torch")
    assert calls == [2] * len(specs) and dispatch._REGISTRY["torch"].clients
    calls.clear()
    batched = moe_lora(x, base, a, b, router, specs, 2.0, backend="torch")
    assert calls == [3]
    assert rel_err(looped, batched) < 1e-6


def test_gradcheck_float64_torch_clients():
    x, base, a, b, router, _, _, specs = client_inputs((2, 5, 4, 3, 3, 2, "adaptive", None),
                                                       torch.float64, seed=1)  # fmt: skip
    assert torch.autograd.gradcheck(
        lambda *v: moe_lora(*v, specs, 1.5, backend="torch"), leaves(x, base, a, b, router),
        eps=1e-6, atol=1e-7,
    )  # fmt: skip


def test_client_shape_errors_name_the_tensors():
    x, base, a, b, router, _, _, specs = client_inputs(CASES[0], torch.float32, seed=0)
    with pytest.raises(ValueError, match="client dimension mismatch"):
        moe_lora(x[:2], base[:2], a, b, router, specs, 1.0)
    with pytest.raises(ValueError, match="2 routing specs for 3 clients"):
        moe_lora(x, base, a, b, router, specs[:2], 1.0)
    mixed = (specs[0], RoutingSpec.make("dense", 3), specs[2])
    with pytest.raises(ValueError, match="differ beyond the own expert"):
        moe_lora(x, base, a, b, router, mixed, 1.0)
