"""The ``cpp`` backend: the compiled kernels of ``fedlease._C`` as one autograd op (CPU; CUDA
too when the extension was built with its CUDA routing kernels).

The C++ library registers ``torch.ops.fedlease.moe_lora_fwd`` / ``moe_lora_bwd``; this module
adds their fake (meta) implementations, so ``torch.compile`` can trace them, and the autograd
formula linking the two. If the extension was not built (``FEDLEASE_NO_EXT=1``) or fails to
load, ``unavailable_reason`` says why and a warning says it once.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..routing import RoutingSpec
from .dispatch import concat_adapters


def _load() -> str | None:
    """Load ``fedlease._C`` and register its Python parts; return why not, or None."""
    try:
        from .. import _C  # noqa: F401
    except ImportError as exc:
        reason = f"the compiled extension fedlease._C is not available ({exc})"
        warnings.warn(f"fedlease: cpp backend disabled: {reason}", RuntimeWarning, stacklevel=2)
        return reason
    _register_python_parts()
    return None


def unavailable_reason(device: torch.device) -> str | None:
    if LOAD_ERROR is not None:
        return LOAD_ERROR
    from .. import _C

    if device.type == "cuda" and not _C.cuda:
        return ("fedlease._C was built without its CUDA routing kernels (a CPU build of torch "
                "or no nvcc at install time)")  # fmt: skip
    if device.type not in ("cpu", "cuda"):
        return f"the compiled kernels run on CPU and CUDA tensors, not {device.type}"
    return None


def _register_python_parts() -> None:
    @torch.library.register_fake("fedlease::moe_lora_fwd")
    def _fwd_fake(x, x_drop, router, a_cat, b_cat, base_out, num_experts, own, keep, scaling):
        t, s, mr = x.shape[0], router.shape[0], a_cat.shape[0]
        return (
            torch.empty_like(base_out),
            x.new_empty(t, s, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32),
            x.new_empty(t, mr),
            x.new_empty(t, mr),
        )

    @torch.library.register_fake("fedlease::moe_lora_bwd")
    def _bwd_fake(dy, x, x_drop, router, a_cat, b_cat, q, a, h, num_experts, own, scaling):
        return (
            torch.empty_like(x),
            torch.empty_like(x) if x_drop is not None else x.new_empty(0),
            torch.empty_like(router),
            torch.empty_like(a_cat),
            torch.empty_like(b_cat),
        )

    def setup_context(ctx, inputs, output):
        x, x_drop, router, a_cat, b_cat, _, num_experts, own, _, scaling = inputs
        _, q, a, h = output
        ctx.save_for_backward(x, x_drop, router, a_cat, b_cat, q, a, h)
        ctx.num_experts, ctx.own, ctx.scaling = num_experts, own, scaling

    def backward(ctx, dy, _dq, _da, _dh):
        x, x_drop, router, a_cat, b_cat, q, a, h = ctx.saved_tensors
        dx, dx_drop, d_router, d_a, d_b = torch.ops.fedlease.moe_lora_bwd(
            dy.contiguous(), x, x_drop, router, a_cat, b_cat, q, a, h,
            ctx.num_experts, ctx.own, ctx.scaling,
        )  # fmt: skip
        return (dx, dx_drop if x_drop is not None else None, d_router, d_a, d_b, dy,
                None, None, None, None)  # fmt: skip

    torch.library.register_autograd("fedlease::moe_lora_fwd", backward, setup_context=setup_context)

    @torch.library.register_fake("fedlease::moe_lora_linear_fwd")
    def _linear_fwd_fake(x, x_drop, weight, bias, router, a_cat, b_cat, num_experts, own, keep,
                         scaling):  # fmt: skip
        t, s, mr = x.shape[0], router.shape[0], a_cat.shape[0]
        return (
            x.new_empty(t, weight.shape[0]),
            x.new_empty(t, s, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32),
            x.new_empty(t, mr),
            x.new_empty(t, mr),
        )

    @torch.library.register_fake("fedlease::moe_lora_linear_bwd")
    def _linear_bwd_fake(dy, x, x_drop, weight, router, a_cat, b_cat, q, a, h, num_experts, own,
                         scaling, need_weight_grad, need_bias_grad):  # fmt: skip
        return (
            torch.empty_like(x),
            torch.empty_like(x) if x_drop is not None else x.new_empty(0),
            torch.empty_like(weight) if need_weight_grad else x.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_bias_grad else x.new_empty(0),
            torch.empty_like(router),
            torch.empty_like(a_cat),
            torch.empty_like(b_cat),
        )

    def linear_setup_context(ctx, inputs, output):
        x, x_drop, weight, bias, router, a_cat, b_cat, num_experts, own, _, scaling = inputs
        _, q, a, h = output
        ctx.save_for_backward(x, x_drop, weight, router, a_cat, b_cat, q, a, h)
        ctx.num_experts, ctx.own, ctx.scaling = num_experts, own, scaling
        ctx.has_bias = bias is not None

    def linear_backward(ctx, dy, _dq, _da, _dh):
        x, x_drop, weight, router, a_cat, b_cat, q, a, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dx_drop, d_w, d_bias, d_router, d_a, d_b = torch.ops.fedlease.moe_lora_linear_bwd(
            dy.contiguous(), x, x_drop, weight, router, a_cat, b_cat, q, a, h,
            ctx.num_experts, ctx.own, ctx.scaling, need[2], ctx.has_bias and need[3],
        )  # fmt: skip
        return (dx, dx_drop if x_drop is not None else None, d_w if need[2] else None,
                d_bias if ctx.has_bias and need[3] else None, d_router, d_a, d_b,
                None, None, None, None)  # fmt: skip

    torch.library.register_autograd(
        "fedlease::moe_lora_linear_fwd", linear_backward, setup_context=linear_setup_context
    )


def moe_lora_cpp(x, base_out, lora_a, lora_b, router, spec: RoutingSpec, scaling, dropout_p):
    a_cat, b_cat = concat_adapters(lora_a, lora_b)
    x = x.contiguous()
    x_drop = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else None
    y, _, _, _ = torch.ops.fedlease.moe_lora_fwd(
        x, x_drop, router.contiguous(), a_cat.contiguous(), b_cat.contiguous(),
        base_out.contiguous(), spec.num_experts, spec.fold_target, spec.keep, float(scaling),
    )  # fmt: skip
    return y


def moe_lora_linear_cpp(
    x, weight, bias, lora_a, lora_b, router, spec: RoutingSpec, scaling, dropout_p
):
    """The whole layer (base GEMM included) as one op, blocked over tokens, on CPU; elsewhere
    (CUDA) the base output from F.linear and the routing op."""
    if x.device.type != "cpu":
        base_out = F.linear(x, weight, bias)
        return moe_lora_cpp(x, base_out, lora_a, lora_b, router, spec, scaling, dropout_p)
    a_cat, b_cat = concat_adapters(lora_a, lora_b)
    x = x.contiguous()
    x_drop = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else None
    y, _, _, _ = torch.ops.fedlease.moe_lora_linear_fwd(
        x, x_drop, weight.contiguous(), None if bias is None else bias.contiguous(),
        router.contiguous(), a_cat.contiguous(), b_cat.contiguous(),
        spec.num_experts, spec.fold_target, spec.keep, float(scaling),
    )  # fmt: skip
    return y


# Loaded once at import, outside any torch.compile trace: None, or why the backend is unavailable.
LOAD_ERROR = _load()
