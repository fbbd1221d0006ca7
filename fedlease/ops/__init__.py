"""The MoE-LoRA op and its backends.

``moe_lora(x, base_out, lora_A, lora_B, router, spec, scaling)`` returns
``base_out + scaling * sum_e g_e(x) * B_e A_e dropout(x)`` with the gates ``g`` from
:func:`fedlease.routing.route` on ``router @ x``; ``moe_lora_linear(x, weight, bias, ...)`` is the
same with ``base_out = x @ weight^T + bias``, which a backend may fuse into the op. Backends:
``torch`` (always), ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``cpp`` (the compiled
CPU extension).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..routing import RoutingSpec
from . import cpp_backend, triton_backend
from .dispatch import (
    BACKEND_NAMES,
    Backend,
    available_backends,
    concat_adapters,
    prefer,
    register,
    resolve_backend,
    unavailable_reason,
)
from .torch_backend import moe_lora_torch


def _torch_backend(x, base_out, lora_a, lora_b, router, spec, scaling, dropout_p):
    """Client-stacked (x (N, T, in), base_out (N, T, out), adapters and routers with a leading N,
    one RoutingSpec per client) in batched GEMMs; one client is the case N = 1."""
    if lora_a.dim() == 3:
        return _torch_backend(x[None], base_out[None], lora_a[None], lora_b[None], router[None],
                              (spec,), scaling, dropout_p)[0]  # fmt: skip
    a_cat, b_cat = concat_adapters(lora_a, lora_b)
    x_drop = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else None
    fold = torch.stack([s.fold_matrix(x.device) for s in spec])
    return moe_lora_torch(x, x_drop, base_out, a_cat, b_cat, router, fold, spec[0], scaling)


register(Backend("torch", _torch_backend, lambda device: None, clients=True))
_F16, _BF16, _F32, _F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
register(
    Backend(
        "cpp",
        cpp_backend.moe_lora_cpp,
        cpp_backend.unavailable_reason,
        linear_fn=cpp_backend.moe_lora_linear_cpp,
        linear_casts=("cpu",),
        linear_shares=("cpu",),
        dtypes={"cpu": (_F32, _BF16, _F64), "cuda": (_F32, _F16, _BF16, _F64)},
    )
)
register(
    Backend(
        "triton",
        triton_backend.moe_lora_triton,
        triton_backend.unavailable_reason,
        linear_fn=triton_backend.moe_lora_linear_triton,
        clients=True,
        dtypes={"cuda": (_F32, _F16, _BF16), "cpu": (_F32, _F16, _BF16)},
    )
)
# CPU: `cpp`'s fused layer op (base GEMM, routing and LoRA per block of tokens) measured 0.91x the
# `torch` time at in = out = 1024 and 0.80x at MiniLM's 384 (benchmarks/RESULTS.md).
prefer("cpu", ("cpp",))
# CUDA: `triton` (0.78-0.85x `cpp`'s time at all four reference shapes on an H100, bf16), then `cpp`
# (ATen GEMMs around its CUDA routing kernels; 0.59-0.82x `torch`'s time), then `torch`
# (benchmarks/RESULTS.md).
prefer("cuda", ("triton", "cpp"))


def moe_lora(
    x: torch.Tensor,
    base_out: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    router: torch.Tensor,
    spec: RoutingSpec | Sequence[RoutingSpec],
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Apply the MoE-LoRA update to ``base_out``; shapes ``x (..., in)``, ``base_out (..., out)``.

    ``lora_A (M, r, in)``, ``lora_B (M, out, r)``, ``router (S, in)``. Dropout (probability
    ``dropout``, only when ``training``) applies to the experts' input, not the router's.

    Several clients at once: ``lora_A (N, M, r, in)``, ``lora_B (N, M, out, r)``, ``router (N, S,
    in)``, ``x (N, ..., in)`` and ``base_out (N, ..., out)``, whose index ``i`` holds client i's
    tokens; ``spec`` one RoutingSpec or one per client (clients differ in their own expert). Each
    token is routed over its own client's experts only.
    """
    specs = _client_specs(spec, lora_A) if lora_A.dim() == 4 else None
    d_in, d_out = _check_shapes(x, lora_A, lora_B, router, specs[0] if specs else spec)
    if base_out.shape[-1] != d_out or base_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, base_out {tuple(base_out.shape)}, "
            f"lora_B {tuple(lora_B.shape)}"
        )
    cast = _autocast_dtype(x)
    if cast is not None:
        with torch.autocast(x.device.type, enabled=False):
            return moe_lora(*_cast((x, base_out, lora_A, lora_B, router), cast), spec, scaling,
                            dropout, training, backend)  # fmt: skip
    impl = resolve_backend(backend, x.device, x.dtype)
    p, lead = (float(dropout) if training else 0.0), x.shape[:-1]
    if specs is not None:
        n = lora_A.shape[0]
        y = _per_client(impl, x.reshape(n, -1, d_in), base_out.reshape(n, -1, d_out), lora_A,
                        lora_B, router, specs, float(scaling), p)  # fmt: skip
        return y.reshape(*lead, d_out)
    y = impl.fn(x.reshape(-1, d_in), base_out.reshape(-1, d_out), lora_A, lora_B, router, spec,
                float(scaling), p)  # fmt: skip
    return y.reshape(*lead, d_out)


def _per_client(impl: Backend, x, base_out, lora_a, lora_b, router, specs, scaling, p):
    """The op on client-stacked tensors: in one call where the backend takes them, else its
    single-client op once per client."""
    if impl.clients:
        return impl.fn(x, base_out, lora_a, lora_b, router, specs, scaling, p)
    return _each_client(lambda *t: impl.fn(*t, scaling, p), (x, base_out, lora_a, lora_b, router),
                        specs)  # fmt: skip


def _each_client(fn, stacked: tuple, specs) -> torch.Tensor:
    """``fn(*client_i_tensors, spec_i)`` for every client of the ``stacked`` tensors, stacked.
    unbind, not t[i]: one backward node for all clients (N selects would each build a full-size
    gradient and add them up: N^2 work)."""
    parts = zip(*(t.unbind(0) for t in stacked), specs)
    return torch.stack([fn(*tensors, spec) for *tensors, spec in parts])


def _each_share(fn, x, shares, stacked: tuple, specs) -> torch.Tensor:
    """``fn(x_i, *client_i_tensors, spec_i)`` on each client's share of x's rows, concatenated
    (unbind: one backward node for all clients)."""
    parts = zip(x.split(list(shares)), *(t.unbind(0) for t in stacked), specs)
    return torch.cat([fn(*part) for part in parts])


def moe_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    router: torch.Tensor,
    spec: RoutingSpec | Sequence[RoutingSpec],
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
    backend: str = "auto",
    fast_dropout: bool = True,
    shares: Sequence[int] | None = None,
) -> torch.Tensor:
    """``x @ weight^T + bias`` plus the MoE-LoRA update: :func:`moe_lora` with the base linear
    inside the op (fused into one blocked pass by the ``cpp`` backend, which also draws the
    dropout mask inside; ``fast_dropout=False`` gives it aten's dropout instead). Takes a client
    dimension as :func:`moe_lora` does; the frozen base is shared by every client. Or, with
    client-stacked adapters, ``x (sum(shares), in)`` holding each client's tokens in turn,
    ``shares[i]`` of client i's (unequal counts: packed batches)."""
    specs = _client_specs(spec, lora_A) if lora_A.dim() == 4 else None
    d_in, d_out = _check_shapes(x, lora_A, lora_B, router, specs[0] if specs else spec, shares)
    if weight.shape != (d_out, d_in) or (bias is not None and bias.shape != (d_out,)):
        bias_shape = None if bias is None else tuple(bias.shape)
        raise ValueError(
            f"base weight {tuple(weight.shape)} / bias {bias_shape} do not fit "
            f"in={d_in}, out={d_out}"
        )
    cast = _autocast_dtype(x)
    impl = resolve_backend(backend, x.device, cast or x.dtype)
    casts_inside = impl.linear_fn is not None and x.device.type in impl.linear_casts
    if cast is not None and not casts_inside:
        with torch.autocast(x.device.type, enabled=False):
            return moe_lora_linear(*_cast((x, weight, bias, lora_A, lora_B, router), cast), spec,
                                   scaling, dropout, training, impl.name, fast_dropout,
                                   shares)  # fmt: skip
    p = float(dropout) if training else 0.0
    shares_inside = x.device.type in impl.linear_shares
    if shares is not None and not shares_inside:  # once per client, on its share of x

        def one(xi, a, b, r, s):
            return moe_lora_linear(xi, weight, bias, a, b, r, s, scaling, p, True, impl.name,
                                   fast_dropout)  # fmt: skip

        return _each_share(one, x, shares, (lora_A, lora_B, router), specs)
    if impl.linear_fn is None:
        return moe_lora(
            x, F.linear(x, weight, bias), lora_A, lora_B, router, spec, scaling, p, True, impl.name
        )
    extra = {"dtype": cast} if casts_inside else {}

    def layer(xi, a, b, r, spec, **kw):
        return impl.linear_fn(xi, weight, bias, a, b, r, spec, float(scaling), p, fast_dropout,
                              **extra, **kw)  # fmt: skip

    if specs is not None:
        return _layer_clients(layer, impl, x, (lora_A, lora_B, router), specs, shares_inside,
                              shares)  # fmt: skip
    if x.dim() == 2:  # no reshapes: each is an autograd node, host time on every call
        return layer(x, lora_A, lora_B, router, spec)
    lead = x.shape[:-1]
    return layer(x.reshape(-1, d_in), lora_A, lora_B, router, spec).reshape(*lead, d_out)


def _layer_clients(layer, impl: Backend, x, stacked, specs, shares_inside, shares):
    """The backend's layer op on client-stacked adapters: every client in one call where it takes
    them (its tokens in given or equal shares, or x stacked per client), else once per client."""
    n, lead, d_in = len(specs), x.shape[:-1], x.shape[-1]
    if shares_inside:
        flat = x.reshape(-1, d_in)
        shares = list(shares) if shares is not None else [len(flat) // n] * n
        y = layer(flat, *stacked, specs, shares=shares)
    elif impl.clients:
        y = layer(x.reshape(n, -1, d_in), *stacked, specs)
    else:
        y = _each_client(layer, (x.reshape(n, -1, d_in), *stacked), specs)
    return y.reshape(*lead, y.shape[-1])


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes linear layers in on ``x``'s device, when it is on there."""
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(tensors, dtype: torch.dtype) -> list:
    """Autocast's rule for a linear op: floating inputs in ``dtype``. ``.to`` is differentiable, so
    each parameter still gets its gradient in its own dtype (float32 master weights stay float32);
    routing inside the backends stays float32 whatever the dtype."""
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


def _client_specs(spec, lora_A: torch.Tensor) -> tuple[RoutingSpec, ...]:
    """One RoutingSpec per client of client-stacked adapters (given once: the same for all);
    they may differ in the own expert only."""
    n = lora_A.shape[0]
    specs = tuple(spec) if isinstance(spec, (list, tuple)) else (spec,) * n
    if len(specs) != n:
        raise ValueError(f"{len(specs)} routing specs for {n} clients")
    first = specs[0]
    for s in specs:
        if (s.num_experts, s.num_slots, s.keep) != (first.num_experts, first.num_slots, first.keep):
            raise ValueError(f"the clients' routing specs differ beyond the own expert: {specs}")
    return specs


def _check_shapes(x, lora_A, lora_B, router, spec, shares=None) -> tuple[int, int]:
    """``(in, out)`` after checking x, the stacked adapters and the router against each other
    (per client when they have a leading client dimension, which x then shares, or which
    ``shares`` splits x's rows into)."""
    if shares is not None:
        _check_token_shares(x, lora_A, shares)
    if lora_A.dim() == 4:
        n = lora_A.shape[0]
        x_clients = len(shares) if shares is not None else x.shape[0]
        if lora_B.dim() != 4 or lora_B.shape[0] != n or router.shape[0] != n or x_clients != n:
            raise ValueError(f"client dimension mismatch: x {tuple(x.shape)}, lora_A "
                             f"{tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}, router "
                             f"{tuple(router.shape)}")  # fmt: skip
        return _check_shapes(x if shares is not None else x[0], lora_A[0], lora_B[0], router[0],
                             spec)  # fmt: skip
    m, r, d_in = lora_A.shape
    d_out = lora_B.shape[1]
    if x.shape[-1] != d_in:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, lora_A {tuple(lora_A.shape)}")
    if lora_B.shape != (m, d_out, r) or router.shape != (spec.num_slots, d_in):
        raise ValueError(
            f"lora_B {tuple(lora_B.shape)} / router {tuple(router.shape)} do not fit "
            f"M={m}, r={r}, in={d_in}, out={d_out}, slots={spec.num_slots}"
        )
    return d_in, d_out


def _check_token_shares(x, lora_A, shares) -> None:
    """``shares`` (each client's token count) against client-stacked adapters and a 2-D x."""
    if lora_A.dim() != 4 or x.dim() != 2:
        raise ValueError(f"token shares need client-stacked adapters and a 2-D x, got lora_A "
                         f"{tuple(lora_A.shape)}, x {tuple(x.shape)}")  # fmt: skip
    if any(int(n) < 0 for n in shares) or sum(int(n) for n in shares) != x.shape[0]:
        raise ValueError(f"token shares {list(shares)} do not split x's {x.shape[0]} rows")


__all__ = [
    "BACKEND_NAMES",
    "available_backends",
    "moe_lora",
    "moe_lora_linear",
    "resolve_backend",
    "unavailable_reason",
]
