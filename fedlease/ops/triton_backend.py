"""The ``triton`` backend: the fused kernels of ``fedlease.kernels`` as one autograd op.

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
from .dispatch import concat_adapters

INTERPRET_ENV = "TRITON_INTERPRET"
SPLIT_T = 8  # token splits of the weight-gradient pass (float32 partials, summed after)


def interpreting() -> bool:
    return os.environ.get(INTERPRET_ENV) == "1"


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
    from ..kernels import moe_lora_bwd, moe_lora_fwd, routing

    return moe_lora_fwd, moe_lora_bwd, routing


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


class MoELoRATritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, base_out, a_cat, b_cat, router, spec: RoutingSpec, scaling, p_drop):
        fwd, _, rt = _kernels()
        x = x.contiguous()
        a_cat, b_cat, router = a_cat.contiguous(), b_cat.contiguous(), router.contiguous()
        t, d = x.shape
        n, mr = b_cat.shape
        s, m = spec.num_slots, spec.num_experts
        r = mr // m
        own = spec.fold_target
        seed = _draw_seed() if p_drop > 0 else 0
        upcast = interpreting() or x.dtype == torch.float32
        cfg = fwd.launch_config(interpreting())
        s_pad, mr_pad = rt.next_pow2_at_least_16(s), rt.next_pow2_at_least_16(mr)
        q = _scratch(t, s, device=x.device, dtype=torch.float32)
        a = _scratch(t, mr, device=x.device, dtype=torch.float32)
        h = _scratch(t, mr, device=x.device, dtype=x.dtype)
        grid = (triton_cdiv(t, cfg["BLOCK_T"]),)
        fwd.shrink_route_kernel[grid](
            x, router, a_cat, q, a, h,
            t, d, s, m, mr, r, own, spec.keep,
            x.stride(0), router.stride(0), a_cat.stride(0),
            seed, float(p_drop),
            HAS_DROPOUT=p_drop > 0, UPCAST=upcast, DOT_PRECISION=_dot_precision(x.dtype),
            BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], S_PAD=s_pad, MR_PAD=mr_pad,
        )  # fmt: skip
        y = base_out.contiguous().clone()
        grid = (triton_cdiv(t, cfg["BLOCK_T"]), triton_cdiv(n, cfg["BLOCK_N"]))
        fwd.expand_kernel[grid](
            h, b_cat, y, t, n, mr, float(scaling), b_cat.stride(0), y.stride(0),
            UPCAST=upcast, DOT_PRECISION=_dot_precision(x.dtype),
            BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"], MR_PAD=mr_pad,
        )  # fmt: skip
        ctx.save_for_backward(x, a_cat, b_cat, router, q, a, h)
        ctx.spec, ctx.scaling, ctx.p_drop, ctx.seed = spec, float(scaling), float(p_drop), seed
        return y

    @staticmethod
    def backward(ctx, dy):
        fwd, bwd, rt = _kernels()
        x, a_cat, b_cat, router, q, a, h = ctx.saved_tensors
        spec, scaling = ctx.spec, ctx.scaling
        dy = dy.contiguous()
        t, d = x.shape
        n, mr = b_cat.shape
        s, m = spec.num_slots, spec.num_experts
        own = spec.fold_target
        upcast = interpreting() or x.dtype == torch.float32
        cfg = fwd.launch_config(interpreting())
        s_pad, mr_pad = rt.next_pow2_at_least_16(s), rt.next_pow2_at_least_16(mr)
        d_logits = _scratch(t, s, device=x.device, dtype=torch.float32)
        d_a = _scratch(t, mr, device=x.device, dtype=torch.float32)
        bwd.grad_route_kernel[(triton_cdiv(t, cfg["BLOCK_T"]),)](
            dy, b_cat, q, a, d_logits, d_a,
            t, n, s, m, mr, mr // m, own, scaling,
            dy.stride(0), b_cat.stride(0),
            UPCAST=upcast, DOT_PRECISION=_dot_precision(x.dtype),
            BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"], S_PAD=s_pad, MR_PAD=mr_pad,
        )  # fmt: skip
        need_x, _, need_a, need_b, need_r = ctx.needs_input_grad[:5]
        need_dw = need_a or need_r
        splits = min(SPLIT_T, triton_cdiv(t, cfg["BLOCK_T"]))
        per_split = triton_cdiv(triton_cdiv(t, splits), cfg["BLOCK_T"]) * cfg["BLOCK_T"]
        splits = triton_cdiv(t, per_split)
        dx = _scratch(t, d, device=x.device, dtype=x.dtype) if need_x else x.new_empty(1)
        dw_r = _scratch(splits, s, d, device=x.device, dtype=torch.float32)
        dw_a = _scratch(splits, mr, d, device=x.device, dtype=torch.float32)
        if need_x or need_dw:
            bwd.grad_input_weights_kernel[(triton_cdiv(d, cfg["BLOCK_D"]), splits)](
                x, router, a_cat, d_logits, d_a, dx, dw_r, dw_a,
                t, d, s, mr, per_split,
                x.stride(0), router.stride(0), a_cat.stride(0), dx.stride(0),
                ctx.seed, ctx.p_drop,
                HAS_DROPOUT=ctx.p_drop > 0, NEED_DX=need_x, NEED_DW=need_dw,
                BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], S_PAD=s_pad, MR_PAD=mr_pad,
            )  # fmt: skip
        d_b = torch.mm(dy.t(), h).mul_(scaling).to(b_cat.dtype) if need_b else None
        return (
            dx if need_x else None,
            dy if ctx.needs_input_grad[1] else None,
            dw_a.sum(0).to(a_cat.dtype) if need_a else None,
            d_b,
            dw_r.sum(0).to(router.dtype) if need_r else None,
            None,
            None,
            None,
        )


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def moe_lora_triton(x, base_out, lora_a, lora_b, router, spec, scaling, dropout_p):
    a_cat, b_cat = concat_adapters(lora_a, lora_b)
    return MoELoRATritonFunction.apply(x, base_out, a_cat, b_cat, router, spec, scaling, dropout_p)


def dropout_mask(seed: int, tokens: int, features: int, p: float, device) -> torch.Tensor:
    """The (tokens, features) inverted-dropout multiplier the kernels use for ``seed``."""
    _, _, rt = _kernels()
    out = torch.empty(tokens, features, device=device, dtype=torch.float32)
    grid = (triton_cdiv(tokens, 32), triton_cdiv(features, 64))
    rt.dropout_mask_kernel[grid](out, tokens, features, seed, float(p), BLOCK_T=32, BLOCK_D=64)
    return out
