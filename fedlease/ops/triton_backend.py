"""The ``triton`` backend: the fused kernels of ``fedlease.kernels`` as autograd ops.

Two ops share the kernels: ``moe_lora_triton`` adds the update to a given base output (read by the
expand kernel, never copied); ``moe_lora_linear_triton`` owns the frozen base GEMM too, in one of
two orders (``BASE_GEMM_FIRST``):

- LoRA first: the expand kernel writes ``scaling * h B^T + bias`` and cuBLAS accumulates ``x W^T``
  onto it (beta = 1); in the backward the LoRA part of dx is written first and the base ``dy W``
  accumulated onto it. No T x N or T x D tensor is read twice outside a GEMM.
- base first: cuBLAS writes ``x W^T`` (and ``dy W``) first and the kernels add onto it (one more
  read of y and of dx), so the GPU starts the long GEMM while the host still launches the kernels.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton was
imported (Triton's interpreter: slow, for tests). Routing is float32 in every dtype; matrix
products accumulate in float32. Under the interpreter every operand is upcast to float32 after
loading, because its bfloat16 arithmetic is wrong.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..routing import RoutingSpec

INTERPRET_ENV = "TRITON_INTERPRET"
# Order of the frozen base GEMM and the LoRA kernels in the linear op (see above). Base first
# measured faster at all four reference shapes on an H100 (0.87-0.98x the other order's
# forward+backward time, benchmarks/RESULTS.md): the host-side launches overlap the long GEMM.
BASE_GEMM_FIRST = True


def interpreting() -> bool:
    return os.environ.get(INTERPRET_ENV) == "1"


@functools.cache
def _interpreting_at_import() -> bool:
    """Triton reads the variable once, when it is imported; so does the launch path (an environ
    lookup per launch costs host time on every call)."""
    return interpreting()


def unavailable_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreting():
            return None
        return f"Triton needs a CUDA device; on CPU set {INTERPRET_ENV}=1 (the slow interpreter)"
    return f"Triton kernels do not support {device.type} tensors"


@functools.cache
def _kernels():
    from ..kernels import launch, moe_lora_bwd, moe_lora_fwd, routing

    return moe_lora_fwd, moe_lora_bwd, routing, launch


# Launch the kernels with their tensors' addresses instead of the tensors
# (``fedlease.kernels.pointer_args``): Triton's launcher then skips its per-tensor ``data_ptr()``
# calls and driver queries. Off until measured on a GPU (benchmarks/bench_layer.py times it as a
# row of its own); never under the interpreter, which needs the tensors.
INT_POINTERS = False


@functools.cache
def _pointer_args():
    from ..kernels import pointer_args

    return pointer_args


def _launch(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)``, with the tensors as addresses when ``INT_POINTERS``."""
    if INT_POINTERS and not _interpreting_at_import():
        return _pointer_args().launch(kernel, grid, *args, **meta)
    return kernel[grid](*args, **meta)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs would otherwise run as TF32 on GPUs (about 1e-3 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


POISON_BUFFERS = False  # tests set this: scratch buffers start as NaN, so unwritten ones show


def _scratch(*shape: int, device, dtype) -> torch.Tensor:
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def _draw_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _upcast(dtype: torch.dtype) -> bool:
    return _interpreting_at_import() or dtype == torch.float32


def _client_stride(t: torch.Tensor, dims: int) -> int:
    """The stride between clients of ``t``, whose one client's part has ``dims`` dimensions (0
    when ``t`` is one client's: its only client never moves off it)."""
    return t.stride(0) if t.dim() > dims else 0


def _forward(ctx, x, lora_a, b, router, y, base=None, bias=None):
    """Shrink + route, then ``y = base + scaling * h B_cat^T + bias`` (base, bias optional), with
    the routing, scaling and dropout ``_prepare`` put on ``ctx``. Returns the saved routing
    tensors ``(q, a, h)``, each ``(C*T, ...)``."""
    spec, scaling, p_drop, seed = ctx.specs[0], ctx.scaling, ctx.p_drop, ctx.seed
    fwd, _, _, launch = _kernels()
    rows, d = x.shape
    c, t = ctx.clients, ctx.tokens
    n, r = b.shape[-2], b.shape[-1]
    mr = spec.num_experts * r
    plan = launch.forward_plan(
        spec.num_slots, mr, _interpreting_at_import(), x.dtype == torch.float32
    )
    upcast, precision = _upcast(x.dtype), _dot_precision(x.dtype)
    q = _scratch(rows, spec.num_slots, device=x.device, dtype=torch.float32)
    a = _scratch(rows, mr, device=x.device, dtype=torch.float32)
    h = _scratch(rows, mr, device=x.device, dtype=x.dtype)
    meta = plan.meta["shrink_route"]
    _launch(
        fwd.shrink_route_kernel, (launch.cdiv(t, meta["BLOCK_T"]), c),
        x, router, lora_a, ctx.own, q, a, h,
        t, d, spec.num_slots, spec.num_experts, mr, r, spec.keep,
        x.stride(0), _client_stride(router, 2), router.stride(-2), _client_stride(lora_a, 3),
        lora_a.stride(-2),
        seed, float(p_drop),
        HAS_DROPOUT=p_drop > 0, UPCAST=upcast, DOT_PRECISION=precision, **meta,
    )  # fmt: skip
    meta = plan.meta["expand"]
    grid = (launch.cdiv(t, meta["BLOCK_T"]), launch.cdiv(n, meta["BLOCK_N"]), c)
    _launch(
        fwd.expand_kernel, grid,
        h, b, y if base is None else base, y if bias is None else bias, y,
        t, n, mr, r, float(scaling),
        _client_stride(b, 3), b.stride(-2), b.stride(-3),
        y.stride(0) if base is None else base.stride(0), y.stride(0),
        HAS_BASE=base is not None, HAS_BIAS=bias is not None,
        UPCAST=upcast, DOT_PRECISION=precision, **meta,
    )  # fmt: skip
    return q, a, h


@functools.lru_cache(maxsize=64)
def _own_experts(specs: tuple[RoutingSpec, ...], device: torch.device) -> torch.Tensor:
    """Each client's own expert (the slot fold target) as an int32 tensor on ``device``: made
    once per set of clients and device, not copied to the device at every call."""
    return torch.tensor([s.fold_target for s in specs], dtype=torch.int32, device=device)


def _route_backward(ctx, dy, b, q, a, plan):
    """``dz (C*T, S + M*r)`` float32: the gradients of the router logits and of ``a``."""
    _, bwd, _, launch = _kernels()
    spec, c, t = ctx.specs[0], ctx.clients, ctx.tokens
    n, r = b.shape[-2], b.shape[-1]
    mr = spec.num_experts * r
    dz = _scratch(dy.shape[0], spec.num_slots + mr, device=dy.device, dtype=torch.float32)
    meta = plan.meta["grad_route"]
    _launch(
        bwd.grad_route_kernel, (launch.cdiv(t, meta["BLOCK_T"]), c),
        dy, b, ctx.own, q, a, dz,
        t, n, spec.num_slots, spec.num_experts, mr, r,
        ctx.scaling, dy.stride(0), _client_stride(b, 3), b.stride(-2), b.stride(-3),
        UPCAST=_upcast(dy.dtype), DOT_PRECISION=_dot_precision(dy.dtype), **meta,
    )  # fmt: skip
    return dz


def _grad_input(ctx, dz, router, lora_a, plan, dtype, dx=None):
    """The LoRA path's dx: ``dlogits @ router + mask * (da @ A_cat)``, added onto ``dx`` when
    given (the base GEMM's), else written to a new tensor."""
    _, bwd, _, launch = _kernels()
    c, t, slots = ctx.clients, ctx.tokens, ctx.specs[0].num_slots
    d = lora_a.shape[-1]
    accumulate = dx is not None
    if dx is None:
        dx = _scratch(dz.shape[0], d, device=dz.device, dtype=dtype)
    meta = plan.meta["grad_input"]
    grid = (launch.cdiv(t, meta["BLOCK_T"]), launch.cdiv(d, plan.cols_per_program), c)
    _launch(
        bwd.grad_input_kernel, grid,
        dz, router, lora_a, dx,
        t, d, slots, dz.shape[1] - slots, plan.cols_per_program,
        _client_stride(router, 2), router.stride(-2), _client_stride(lora_a, 3),
        lora_a.stride(-2), dx.stride(0),
        ctx.seed, ctx.p_drop,
        HAS_DROPOUT=ctx.p_drop > 0, ACCUMULATE=accumulate, UPCAST=_upcast(dtype),
        DOT_PRECISION=_dot_precision(dtype), **meta,
    )  # fmt: skip
    return dx


def _grad_weights(ctx, dz, x, plan, dtype):
    """``d[router; A_cat] = dz^T [x, dropout(x)]`` per client, accumulated in float32: written in
    ``dtype`` by the kernel itself when each client's tokens are one split, else float32
    token-split partials summed in one reduction each that writes ``dtype``. Returns the router's
    ``(.., S, D)`` and A_cat's ``(.., M*r, D)`` (a leading client dimension when the op has one),
    both contiguous."""
    _, bwd, _, launch = _kernels()
    c, t, slots = ctx.clients, ctx.tokens, ctx.specs[0].num_slots
    d, k = x.shape[1], dz.shape[1]
    meta = plan.meta["grad_weights"]
    part_dtype = dtype if plan.splits == 1 else torch.float32
    d_router = _scratch(plan.splits, *ctx.lead, slots, d, device=x.device, dtype=part_dtype)
    d_a = _scratch(plan.splits, *ctx.lead, k - slots, d, device=x.device, dtype=part_dtype)
    grid = (launch.cdiv(d, meta["BLOCK_D"]), launch.cdiv(k, meta["BLOCK_K"]), plan.splits * c)
    _launch(
        bwd.grad_weights_kernel, grid,
        dz, x, d_router, d_a,
        t, d, slots, k, plan.tokens_per_split, c, x.stride(0),
        ctx.seed, ctx.p_drop,
        HAS_DROPOUT=ctx.p_drop > 0, UPCAST=_upcast(x.dtype),
        DOT_PRECISION=_dot_precision(x.dtype), **meta,
    )  # fmt: skip
    if plan.splits == 1:
        return d_router[0], d_a[0]
    return d_router.sum(0, dtype=dtype), d_a.sum(0, dtype=dtype)


def _lora_backward(ctx, dy, need_x, need_a, need_b, need_r, dx=None):
    """``(dx, dA, dB, d_router)`` in the shapes of the op's inputs (dx in rows), each None unless
    asked for; the LoRA path's dx is added onto ``dx`` when given."""
    launch = _kernels()[3]
    x, lora_a, b, router, q, a, h = ctx.saved_tensors[:7]
    c, t, lead = ctx.clients, ctx.tokens, ctx.lead
    m, r = lora_a.shape[-3], lora_a.shape[-2]
    plan = launch.backward_plan(t, x.shape[1], ctx.specs[0].num_slots, m * r,
                                _interpreting_at_import(), x.dtype == torch.float32, c)  # fmt: skip
    dz = _route_backward(ctx, dy, b, q, a, plan)
    if need_x:
        dx = _grad_input(ctx, dz, router, lora_a, plan, x.dtype, dx)
    d_a = d_r = d_b = None
    if need_a or need_r:  # router and A share one dtype (the layer's parameters)
        d_r, d_a = _grad_weights(ctx, dz, x, plan, lora_a.dtype)
        d_a = d_a.view(lora_a.shape)
    if need_b:
        d_b = _grad_b(ctx, dy, h, b.shape[-2]).view(*lead, b.shape[-2], m, r).transpose(-3, -2)
    return dx, d_a, d_b, d_r


def _grad_b(ctx, dy, h, n):
    """``dB_cat = scaling * dy^T h`` per client, ``(.., out, M*r)``, by the vendor BLAS (beta = 0:
    the input only gives the shape; alpha applies the scaling inside the GEMM)."""
    mr = h.shape[1]
    if not ctx.lead:
        shape_only = h.new_empty(1, 1).expand(n, mr)
        return torch.addmm(shape_only, dy.t(), h, beta=0, alpha=ctx.scaling)
    c, t = ctx.clients, ctx.tokens
    shape_only = h.new_empty(1, 1, 1).expand(c, n, mr)
    return torch.baddbmm(shape_only, dy.view(c, t, n).transpose(1, 2), h.view(c, t, mr),
                         beta=0, alpha=ctx.scaling)  # fmt: skip


def _prepare(ctx, x, lora_a, lora_b, router, specs, scaling, p_drop):
    """The op's inputs as the kernels read them: ``x`` contiguous as ``(C*T, in)``; ``A``, ``B``
    and the router as they are (contiguous A and router, B with unit last stride), one client's
    or client-stacked: the kernels read A as ``A_cat`` and B as ``B_cat`` in place, with a client
    stride of 0 for one client (no copy, no view per call). Routing, scaling, dropout seed, the
    clients and their own experts go on ``ctx``."""
    ctx.lead = lora_a.shape[:-3]  # () for one client, (C,) for several
    c = ctx.lead[0] if ctx.lead else 1
    ctx.x_shape = x.shape
    x = _rows(x)
    lora_a = lora_a if lora_a.is_contiguous() else lora_a.contiguous()
    b = lora_b if lora_b.stride(-1) == 1 else lora_b.contiguous()
    router = router if router.is_contiguous() else router.contiguous()
    ctx.specs = tuple(specs) if ctx.lead else (specs,)
    ctx.own = _own_experts(ctx.specs, x.device)
    ctx.scaling, ctx.p_drop = float(scaling), float(p_drop)
    ctx.clients, ctx.tokens = c, x.shape[0] // c
    ctx.seed = _draw_seed() if p_drop > 0 else 0
    return x, lora_a, b, router


def _like_x(ctx, y: torch.Tensor) -> torch.Tensor:
    """``y (C*T, n)`` in the leading shape of the op's ``x``."""
    x_shape = ctx.x_shape
    return y if len(x_shape) == 2 else y.view(*x_shape[:-1], y.shape[1])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t (..., n)`` as a contiguous ``(rows, n)`` matrix (itself when it is one)."""
    t = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    return t if t.is_contiguous() else t.contiguous()


class MoELoRATritonFunction(torch.autograd.Function):
    """``base_out + scaling * sum_e g_e B_e A_e dropout(x)`` for a given base output; one client
    (``A (M, r, in)``, one spec) or several (``A (C, M, r, in)``, ``x (C, T, in)``, a spec each)."""

    @staticmethod
    def forward(ctx, x, base_out, lora_a, lora_b, router, specs, scaling, p_drop):
        x, lora_a, b, router = _prepare(ctx, x, lora_a, lora_b, router, specs, scaling, p_drop)
        base_out = _rows(base_out)
        y = torch.empty_like(base_out)
        q, a, h = _forward(ctx, x, lora_a, b, router, y, base=base_out)
        ctx.save_for_backward(x, lora_a, b, router, q, a, h)
        return _like_x(ctx, y)

    @staticmethod
    def backward(ctx, dy_out):
        dy = _rows(dy_out)
        need_x, need_base, need_a, need_b, need_r = ctx.needs_input_grad[:5]
        dx, d_a, d_b, d_r = _lora_backward(ctx, dy, need_x, need_a, need_b, need_r)
        d_base = dy_out if need_base else None
        return _like_x(ctx, dx) if need_x else None, d_base, d_a, d_b, d_r, None, None, None


class MoELoRALinearTritonFunction(torch.autograd.Function):
    """``x W^T + bias + scaling * sum_e g_e B_e A_e dropout(x)``: the layer, base GEMM inside
    (one GEMM over every client's tokens when there are several)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, router, specs, scaling, p_drop):
        x, lora_a, b, router = _prepare(ctx, x, lora_a, lora_b, router, specs, scaling, p_drop)
        ctx.base_first = BASE_GEMM_FIRST
        if ctx.base_first:  # cuBLAS first; the expand kernel adds onto y in place
            y = torch.mm(x, weight.t())
            q, a, h = _forward(ctx, x, lora_a, b, router, y, base=y, bias=bias)
        else:  # the expand kernel writes y; the base GEMM accumulates onto it (beta = 1)
            y = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
            q, a, h = _forward(ctx, x, lora_a, b, router, y, bias=bias)
            y.addmm_(x, weight.t())
        ctx.save_for_backward(x, lora_a, b, router, q, a, h, weight)
        ctx.has_bias = bias is not None
        return _like_x(ctx, y)

    @staticmethod
    def backward(ctx, dy):
        dy = _rows(dy)
        x, weight = ctx.saved_tensors[0], ctx.saved_tensors[7]
        need_x, need_w, need_bias, need_a, need_b, need_r = ctx.needs_input_grad[:6]
        base_dx = torch.mm(dy, weight) if need_x and ctx.base_first else None
        dx, d_a, d_b, d_r = _lora_backward(ctx, dy, need_x, need_a, need_b, need_r, base_dx)
        if need_x and not ctx.base_first:
            dx.addmm_(dy, weight)  # the base's dx accumulates onto the LoRA part's
        d_w = dy.t() @ x if need_w else None
        d_bias = dy.sum(0) if ctx.has_bias and need_bias else None
        return _like_x(ctx, dx) if need_x else None, d_w, d_bias, d_a, d_b, d_r, None, None, None


def moe_lora_triton(x, base_out, lora_a, lora_b, router, spec, scaling, dropout_p):
    """The op for one client, or for several (``lora_A (C, M, r, in)``, ``x (C, T, in)``, one
    RoutingSpec per client): every kernel launch covers all clients. Dropout: one seed per call,
    each token's mask keyed by its row among all clients' rows."""
    return MoELoRATritonFunction.apply(
        x, base_out, lora_a, lora_b, router, spec, scaling, dropout_p
    )


def moe_lora_linear_triton(x, weight, bias, lora_a, lora_b, router, spec, scaling, dropout_p,
                           fast_dropout=True):  # fmt: skip
    """The layer, for one client or several as ``moe_lora_triton``; its dropout mask is always
    drawn in-kernel (``fast_dropout`` is ignored)."""
    return MoELoRALinearTritonFunction.apply(
        x, weight, bias, lora_a, lora_b, router, spec, scaling, dropout_p
    )


def dropout_mask(seed: int, tokens: int, features: int, p: float, device) -> torch.Tensor:
    """The (tokens, features) inverted-dropout multiplier the kernels use for ``seed``."""
    _, _, rt, launch = _kernels()
    out = torch.empty(tokens, features, device=device, dtype=torch.float32)
    grid = (launch.cdiv(tokens, 32), launch.cdiv(features, 64))
    rt.dropout_mask_kernel[grid](out, tokens, features, seed, float(p), BLOCK_T=32, BLOCK_D=64)
    return out
