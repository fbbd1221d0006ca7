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
    _check_isa_override()
    return None


PHILOX_ISAS = ("generic", "avx2", "avx512")  # what csrc/dropout.cpp's best_isa() understands


def _check_isa_override() -> None:
    """``FEDLEASE_PHILOX_ISA`` (a developer's knob: run a narrower implementation of the CPU
    kernels on a wider CPU) with a value the kernels do not know means the widest: say so."""
    import os

    value = os.environ.get("FEDLEASE_PHILOX_ISA")
    if value and value not in PHILOX_ISAS:
        warnings.warn(f"fedlease: FEDLEASE_PHILOX_ISA={value!r} is not one of "
                      f"{', '.join(PHILOX_ISAS)}: the widest this CPU has is used", RuntimeWarning,
                      stacklevel=2)  # fmt: skip


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
    _register_moe_lora()
    _register_moe_lora_linear()
    _register_dropout()


def _routing_outputs(x, router, a_cat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake ``(q, a, h)`` of a forward op: q in the routing dtype (float64 for float64 inputs)."""
    t, s, mr = x.shape[0], router.shape[-2], a_cat.shape[-2]  # (clients, rows, in) or (rows, in)
    routing = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(t, s, dtype=routing), x.new_empty(t, mr), x.new_empty(t, mr)


def _register_moe_lora() -> None:
    @torch.library.register_fake("fedlease::moe_lora_fwd")
    def _fwd_fake(x, x_drop, router, a_cat, b_cat, base_out, num_experts, own, keep, scaling):
        return (torch.empty_like(base_out), *_routing_outputs(x, router, a_cat))

    @torch.library.register_fake("fedlease::moe_lora_bwd")
    def _bwd_fake(dy, x, x_drop, router, a_cat, b_cat, q, a, h, num_experts, own, scaling):
        dx_drop = torch.empty_like(x) if x_drop is not None else x.new_empty(0)
        return (torch.empty_like(x), dx_drop, torch.empty_like(router), torch.empty_like(a_cat),
                torch.empty_like(b_cat))  # fmt: skip

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


def _register_moe_lora_linear() -> None:
    @torch.library.register_fake("fedlease::moe_lora_linear_fwd")
    def _fwd_fake(x, x_drop, weight, bias, router, a_cat, b_cat, num_experts, owns, shares, keep,
                  scaling, p, seed):  # fmt: skip
        return (x.new_empty(x.shape[0], weight.shape[0]), *_routing_outputs(x, router, a_cat))

    @torch.library.register_fake("fedlease::moe_lora_linear_bwd")
    def _bwd_fake(dy, x, x_drop, weight, router, a_cat, b_cat, q, a, h, num_experts, owns,
                  shares, scaling, p, seed, need_input_grad, need_weight_grad,
                  need_bias_grad):  # fmt: skip
        dx_drop = torch.empty_like(x) if x_drop is not None else x.new_empty(0)
        d_w = torch.empty_like(weight) if need_weight_grad else x.new_empty(0)
        d_bias = weight.new_empty(weight.shape[0]) if need_bias_grad else x.new_empty(0)
        dx = torch.empty_like(x) if need_input_grad else x.new_empty(0)
        return (dx, dx_drop, d_w, d_bias, torch.empty_like(router),
                torch.empty_like(a_cat), torch.empty_like(b_cat))  # fmt: skip

    @torch.library.register_fake("fedlease::moe_lora_linear")
    def _layer_fake(x, x_drop, weight, bias, router, lora_a, lora_b, num_experts, owns, keep,
                    scaling, p, seed, shares=(), dtype=None):  # fmt: skip
        return x.new_empty(x.shape[0], weight.shape[0], dtype=dtype or x.dtype)

    # (the autograd formula of `moe_lora_linear`, around these two kernels, is in C++:
    # csrc/autograd.cpp)


def _register_dropout() -> None:
    """``philox_dropout`` returns its keep mask beside its output; its backward scales dy by it
    (``apply_keep_mask``). Both autograd formulas are in C++ (csrc/autograd.cpp)."""

    @torch.library.register_fake("fedlease::philox_dropout")
    def _fake(x, p, seed):
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        return y, torch.empty_like(y, dtype=torch.uint8)

    @torch.library.register_fake("fedlease::apply_keep_mask")
    def _apply_fake(dy, keep, p):
        return torch.empty_like(dy, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fedlease::softmax_dropout")
    def _softmax_fake(scores, mask, scale, p, seed):
        out = torch.empty_like(scores, memory_format=torch.contiguous_format)
        return out, torch.empty_like(out), torch.empty_like(out, dtype=torch.uint8)

    @torch.library.register_fake("fedlease::softmax_dropout_backward")
    def _softmax_back_fake(grad, probs, keep, scale, p):
        return torch.empty_like(probs, memory_format=torch.contiguous_format)


def draw_seed() -> int:
    """A 63-bit seed from torch's default CPU generator: ``torch.manual_seed`` fixes the masks,
    and activation checkpointing, which replays the generator's state, draws the same one."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


def philox_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of a CPU tensor with a counter-based mask (``csrc/dropout.cpp``); the
    backward scales the gradient by the mask the forward drew (one byte an element)."""
    return torch.ops.fedlease.philox_dropout(x, float(p), draw_seed())[0]


def softmax_dropout(scores: torch.Tensor, mask: torch.Tensor | None, scale: float,
                    p: float) -> torch.Tensor:  # fmt: skip
    """``dropout(softmax(scale * scores + mask))`` over the last dimension of a CPU tensor
    (float32 or bfloat16; ``mask`` additive, broadcastable to ``scores``) in one pass, the
    dropout mask drawn as :func:`philox_dropout` draws it; its backward in one pass too."""
    return torch.ops.fedlease.softmax_dropout(scores, mask, float(scale), float(p), draw_seed())[0]


def moe_lora_cpp(x, base_out, lora_a, lora_b, router, spec: RoutingSpec, scaling, dropout_p):
    a_cat, b_cat = concat_adapters(lora_a, lora_b)
    x = x.contiguous()
    x_drop = None
    if dropout_p > 0:
        fast = x.is_cpu and not torch.compiler.is_compiling()
        x_drop = philox_dropout(x, dropout_p) if fast else F.dropout(x, dropout_p, True)
    y, _, _, _ = torch.ops.fedlease.moe_lora_fwd(
        x, x_drop, router.contiguous(), a_cat.contiguous(), b_cat.contiguous(),
        base_out.contiguous(), spec.num_experts, spec.fold_target, spec.keep, float(scaling),
    )  # fmt: skip
    return y


def moe_lora_linear_cpp(x, weight, bias, lora_a, lora_b, router, spec, scaling, dropout_p,
                        fast_dropout: bool = True, dtype=None, shares=None):  # fmt: skip
    """The whole layer (base GEMM included) as one op, blocked over tokens, on CPU, drawing the
    experts' dropout mask inside (``draw_seed``; with ``fast_dropout=False`` aten's dropout,
    materialised, instead) and computing in ``dtype`` (autocast's; None: x's), with its
    autograd formula in C++ (csrc/autograd.cpp); elsewhere (CUDA) the base output from
    F.linear and the routing op.

    Several clients at once (CPU): adapters and router with a leading client dimension, one
    RoutingSpec per client, x ``(sum(shares), in)`` with each client's tokens in turn,
    ``shares[i]`` of client i's (equal shares when None), in one call: each block of tokens
    with its own client's tensors."""
    if lora_a.dim() == 4:
        n = lora_a.shape[0]
        shares = list(shares) if shares is not None else [x.shape[0] // n] * n
        return _layer_op(x, weight, bias, lora_a, lora_b, router, spec[0],
                         [s.fold_target for s in spec], scaling, dropout_p, fast_dropout, dtype,
                         shares)  # fmt: skip
    if x.device.type != "cpu":
        base_out = F.linear(x, weight, bias)
        return moe_lora_cpp(x, base_out, lora_a, lora_b, router, spec, scaling, dropout_p)
    return _layer_op(x, weight, bias, lora_a, lora_b, router, spec, [spec.fold_target], scaling,
                     dropout_p, fast_dropout, dtype, ())  # fmt: skip


def _layer_op(x, weight, bias, lora_a, lora_b, router, spec, owns, scaling, dropout_p,
              fast_dropout, dtype, shares):  # fmt: skip
    """``fedlease::moe_lora_linear`` on CPU tensors, with its dropout mask's seed or aten's mask."""
    x_drop, seed = None, 0
    if dropout_p > 0 and fast_dropout and not torch.compiler.is_compiling():
        seed = draw_seed()  # (a traced graph cannot draw it: it gets F.dropout's mask below)
    elif dropout_p > 0:
        x_drop = F.dropout(x, dropout_p, training=True)
    return torch.ops.fedlease.moe_lora_linear(
        x, x_drop, weight, bias, router, lora_a, lora_b, spec.num_experts, owns, spec.keep,
        float(scaling), float(dropout_p), seed, shares, dtype,
    )  # fmt: skip


# Loaded once at import, outside any torch.compile trace: None, or why the backend is unavailable.
LOAD_ERROR = _load()
