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


def _forward(ctx, x, a_cat, b, router, y, base=None, bias=None):
    """Shrink + route, then ``y = base + scaling * h B_cat^T + bias`` (base, bias optional), with
    the routing, scaling and dropout ``_prepare`` put on ``ctx``. Returns the saved routing
    tensors ``(q, a, h)``."""
    spec, scaling, p_drop, seed = ctx.spec, ctx.scaling, ctx.p_drop, ctx.seed
    fwd, _, _, launch = _kernels()
    t, d = x.shape
    m, n, r = b.shape
    mr = m * r
    plan = launch.forward_plan(
        spec.num_slots, mr, _interpreting_at_import(), x.dtype == torch.float32
    )
    upcast, precision = _upcast(x.dtype), _dot_precision(x.dtype)
    q = _scratch(t, spec.num_slots, device=x.device, dtype=torch.float32)
    a = _scratch(t, mr, device=x.device, dtype=torch.float32)
    h = _scratch(t, mr, device=x.device, dtype=x.dtype)
    meta = plan.meta["shrink_route"]
    _launch(
        fwd.shrink_route_kernel, (launch.cdiv(t, meta["BLOCK_T"]),),
        x, router, a_cat, q, a, h,
        t, d, spec.num_slots, spec.num_experts, mr, mr // spec.num_experts, spec.fold_target,
        spec.keep, x.stride(0), router.stride(0), a_cat.stride(0),
        seed, float(p_drop),
        HAS_DROPOUT=p_drop > 0, UPCAST=upcast, DOT_PRECISION=precision, **meta,
    )  # fmt: skip
    meta = plan.meta["expand"]
    grid = (launch.cdiv(t, meta["BLOCK_T"]), launch.cdiv(n, meta["BLOCK_N"]))
    _launch(
        fwd.expand_kernel, grid,
        h, b, y if base is None else base, y if bias is None else bias, y,
        t, n, mr, r, float(scaling),
        b.stride(1), b.stride(0), y.stride(0) if base is None else base.stride(0), y.stride(0),
        HAS_BASE=base is not None, HAS_BIAS=bias is not None,
        UPCAST=upcast, DOT_PRECISION=precision, **meta,
    )  # fmt: skip
    return q, a, h


def _route_backward(dy, b, q, a, spec, scaling, plan):
    """``dz (T, S + M*r)`` float32: the gradients of the router logits and of ``a``."""
    _, bwd, _, launch = _kernels()
    t = dy.shape[0]
    m, n, r = b.shape
    mr = m * r
    dz = _scratch(t, spec.num_slots + mr, device=dy.device, dtype=torch.float32)
    meta = plan.meta["grad_route"]
    _launch(
        bwd.grad_route_kernel, (launch.cdiv(t, meta["BLOCK_T"]),),
        dy, b, q, a, dz,
        t, n, spec.num_slots, spec.num_experts, mr, r, spec.fold_target,
        float(scaling), dy.stride(0), b.stride(1), b.stride(0),
        UPCAST=_upcast(dy.dtype), DOT_PRECISION=_dot_precision(dy.dtype), **meta,
    )  # fmt: skip
    return dz


def _grad_input(dz, router, a_cat, spec, seed, p_drop, plan, dtype, dx=None):
    """The LoRA path's dx: ``dlogits @ router + mask * (da @ A_cat)``, added onto ``dx`` when
    given (the base GEMM's), else written to a new tensor."""
    _, bwd, _, launch = _kernels()
    t = dz.shape[0]
    mr, d = a_cat.shape
    accumulate = dx is not None
    if dx is None:
        dx = _scratch(t, d, device=dz.device, dtype=dtype)
    meta = plan.meta["grad_input"]
    grid = (launch.cdiv(t, meta["BLOCK_T"]), launch.cdiv(d, plan.cols_per_program))
    _launch(
        bwd.grad_input_kernel, grid,
        dz, router, a_cat, dx,
        t, d, spec.num_slots, mr, plan.cols_per_program,
        router.stride(0), a_cat.stride(0), dx.stride(0),
        seed, float(p_drop),
        HAS_DROPOUT=p_drop > 0, ACCUMULATE=accumulate, UPCAST=_upcast(dtype),
        DOT_PRECISION=_dot_precision(dtype), **meta,
    )  # fmt: skip
    return dx


def _grad_weights(dz, x, spec, seed, p_drop, plan, dtype):
    """``d[router; A_cat] = dz^T [x, dropout(x)]``, accumulated in float32: written in ``dtype``
    by the kernel itself when the tokens are one split, else float32 token-split partials summed
    in one reduction that writes ``dtype``."""
    _, bwd, _, launch = _kernels()
    t, d = x.shape
    k = dz.shape[1]
    meta = plan.meta["grad_weights"]
    part_dtype = dtype if plan.splits == 1 else torch.float32
    part = _scratch(plan.splits, k, d, device=x.device, dtype=part_dtype)
    grid = (launch.cdiv(d, meta["BLOCK_D"]), launch.cdiv(k, meta["BLOCK_K"]), plan.splits)
    _launch(
        bwd.grad_weights_kernel, grid,
        dz, x, part,
        t, d, spec.num_slots, k, plan.tokens_per_split, x.stride(0),
        seed, float(p_drop),
        HAS_DROPOUT=p_drop > 0, UPCAST=_upcast(x.dtype), DOT_PRECISION=_dot_precision(x.dtype),
        **meta,
    )  # fmt: skip
    dw = part[0] if plan.splits == 1 else part.sum(0, dtype=dtype)
    return dw[: spec.num_slots], dw[spec.num_slots :]


def _lora_backward(ctx, dy, need_x, need_a, need_b, need_r, dx=None):
    """``(dx, dA_cat, dB_cat, d_router)``, each None unless asked for; the LoRA path's dx is
    added onto ``dx`` when given."""
    launch = _kernels()[3]
    x, a_cat, b, router, q, a, h = ctx.saved_tensors[:7]
    spec, scaling = ctx.spec, ctx.scaling
    t, d = x.shape
    plan = launch.backward_plan(
        t, d, spec.num_slots, a_cat.shape[0], _interpreting_at_import(), x.dtype == torch.float32
    )
    dz = _route_backward(dy, b, q, a, spec, scaling, plan)
    if need_x:
        dx = _grad_input(dz, router, a_cat, spec, ctx.seed, ctx.p_drop, plan, x.dtype, dx)
    d_a = d_r = d_b = None
    if need_a or need_r:  # router and A share one dtype (the layer's parameters)
        d_r, d_a = _grad_weights(dz, x, spec, ctx.seed, ctx.p_drop, plan, a_cat.dtype)
    if need_b:  # beta = 0: the input only gives the shape; alpha applies the scaling in the GEMM
        shape_only = h.new_empty(1, 1).expand(b.shape[1], h.shape[1])
        d_b = torch.addmm(shape_only, dy.t(), h, beta=0, alpha=scaling)
    return dx, d_a, d_b, d_r


def _prepare(ctx, x, lora_a, lora_b, router, spec, scaling, p_drop):
    """Contiguous ``x``, ``A_cat (M*r, in)`` (a view of ``A``), the stacked ``B (M, out, r)`` as it
    is (the kernels read it as ``B_cat`` in place: no copy per call), router. Done inside the op
    rather than by autograd-tracked views before it: fewer graph nodes, less host time per call;
    ``_stacked_grads`` maps the gradients back."""
    x = x.contiguous()
    a_cat = lora_a.flatten(0, 1).contiguous()
    b = lora_b if lora_b.stride(-1) == 1 else lora_b.contiguous()
    router = router.contiguous()
    ctx.spec, ctx.scaling, ctx.p_drop = spec, float(scaling), float(p_drop)
    ctx.stacked_shape = lora_a.shape[0], lora_a.shape[1]
    ctx.seed = _draw_seed() if p_drop > 0 else 0
    return x, a_cat, b, router


def _stacked_grads(ctx, d_a, d_b):
    """``dA_cat (M*r, in)``, ``dB_cat (out, M*r)`` as gradients of ``A (M, r, in)``, ``B (M, out,
    r)``."""
    m, r = ctx.stacked_shape
    if d_a is not None:
        d_a = d_a.view(m, r, d_a.shape[1])
    if d_b is not None:
        d_b = d_b.view(d_b.shape[0], m, r).permute(1, 0, 2)
    return d_a, d_b


class MoELoRATritonFunction(torch.autograd.Function):
    """``base_out + scaling * sum_e g_e B_e A_e dropout(x)`` for a given base output."""

    @staticmethod
    def forward(ctx, x, base_out, lora_a, lora_b, router, spec: RoutingSpec, scaling, p_drop):
        x, a_cat, b, router = _prepare(ctx, x, lora_a, lora_b, router, spec, scaling, p_drop)
        base_out = base_out.contiguous()
        y = torch.empty_like(base_out)
        q, a, h = _forward(ctx, x, a_cat, b, router, y, base=base_out)
        ctx.save_for_backward(x, a_cat, b, router, q, a, h)
        return y

    @staticmethod
    def backward(ctx, dy):
        dy = dy.contiguous()
        need_x, need_base, need_a, need_b, need_r = ctx.needs_input_grad[:5]
        dx, d_a, d_b, d_r = _lora_backward(ctx, dy, need_x, need_a, need_b, need_r)
        d_a, d_b = _stacked_grads(ctx, d_a, d_b)
        return dx, dy if need_base else None, d_a, d_b, d_r, None, None, None


class MoELoRALinearTritonFunction(torch.autograd.Function):
    """``x W^T + bias + scaling * sum_e g_e B_e A_e dropout(x)``: the layer, base GEMM inside."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, router, spec: RoutingSpec, scaling, p_drop):
        x, a_cat, b, router = _prepare(ctx, x, lora_a, lora_b, router, spec, scaling, p_drop)
        ctx.base_first = BASE_GEMM_FIRST
        if ctx.base_first:  # cuBLAS first; the expand kernel adds onto y in place
            y = torch.mm(x, weight.t())
            q, a, h = _forward(ctx, x, a_cat, b, router, y, base=y, bias=bias)
        else:  # the expand kernel writes y; the base GEMM accumulates onto it (beta = 1)
            y = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
            q, a, h = _forward(ctx, x, a_cat, b, router, y, bias=bias)
            y.addmm_(x, weight.t())
        ctx.save_for_backward(x, a_cat, b, router, q, a, h, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        dy = dy.contiguous()
        x, weight = ctx.saved_tensors[0], ctx.saved_tensors[7]
        need_x, need_w, need_bias, need_a, need_b, need_r = ctx.needs_input_grad[:6]
        base_dx = torch.mm(dy, weight) if need_x and ctx.base_first else None
        dx, d_a, d_b, d_r = _lora_backward(ctx, dy, need_x, need_a, need_b, need_r, base_dx)
        if need_x and not ctx.base_first:
            dx.addmm_(dy, weight)  # the base's dx accumulates onto the LoRA part's
        d_a, d_b = _stacked_grads(ctx, d_a, d_b)
        d_w = dy.t() @ x if need_w else None
        d_bias = dy.sum(0) if ctx.has_bias and need_bias else None
        return dx, d_w, d_bias, d_a, d_b, d_r, None, None, None


def moe_lora_triton(x, base_out, lora_a, lora_b, router, spec, scaling, dropout_p):
    return MoELoRATritonFunction.apply(
        x, base_out, lora_a, lora_b, router, spec, scaling, dropout_p
    )


def moe_lora_linear_triton(x, weight, bias, lora_a, lora_b, router, spec, scaling, dropout_p,
                           fast_dropout=True):  # fmt: skip
    """The layer; its dropout mask is always drawn in-kernel (``fast_dropout`` is ignored)."""
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
