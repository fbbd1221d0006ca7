"""Fast dropout for a model's own dropouts on CPU.

aten's CPU dropout draws a Bernoulli number per element from the mt19937 generator (5-8 ns an
element on one thread, single-threaded for small tensors), which measured 42 % of a MiniLM bf16
training step on a Xeon with AMX. :func:`dropout` draws the mask from a counter-based generator
instead (Philox4x32-10 in ``csrc/dropout.cpp``: vectorised, parallel over threads, the mask a
pure function of a seed drawn from torch's generator and the element index), and its backward
scales the gradient by the mask it kept (a byte an element; the MoE-LoRA layer's op draws its
mask again instead). Same distribution as ``F.dropout``: each element
kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``. Inside ``torch.compile`` it is
``F.dropout``, which the compiler generates its own random numbers for.

:func:`use_fast_dropout` puts it into a model: every ``nn.Dropout`` becomes a
:class:`PhiloxDropout` and an eager attention becomes ``fedlease_eager`` (the same attention with
this dropout on its probabilities). ``use_fast_dropout(model, False)`` undoes both. On other
devices, or without the compiled extension, it is ``F.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer import MoELoRALinear
from .ops import cpp_backend

ATTENTION = "fedlease_eager"


def available() -> bool:
    """Whether the compiled counter-based dropout is here (``fedlease._C`` built)."""
    return cpp_backend.LOAD_ERROR is None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout: the counter-based kernel for CPU tensors, ``F.dropout`` elsewhere."""
    if not training or p == 0.0:
        return x
    if x.is_cpu and x.is_floating_point() and available() and not torch.compiler.is_compiling():
        return cpp_backend.philox_dropout(x, p)
    return F.dropout(x, p, training=True)  # a compiled graph draws its own (inductor's Philox)


_dropout = dropout  # for the attention function, whose `dropout` argument is a probability


class PhiloxDropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout` (same ``p``, same train/eval behaviour)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    packed=None, first_tokens=False, **kwargs):  # fmt: skip
    """The eager attention of BERT-like encoders (grouped key/value heads too) with
    :func:`dropout` on the attention probabilities. Softmax in the scores' dtype, as BERT's
    (a float32 softmax of bf16 scores and the casts around it cost 6 % of a MiniLM bf16 step).
    A module whose ``dropout`` is still an ``nn.Dropout`` (not swapped by :func:`use_fast_dropout`)
    gets aten's dropout. In training on the CPU the scaling, mask, softmax and dropout are one
    compiled op (``softmax_dropout``, csrc/softmax_dropout.cpp: one pass instead of five forward,
    three backward); in eval mode the computation is eager's, op for op. :func:`use_fast_dropout`
    installs it only on models whose attention dropout is not 0.

    ``packed`` (``fedlease.packing``): the tokens of the batch come as one row
    (:func:`_packed_attention`); with ``first_tokens`` the queries are the sequences' first
    tokens only (``fedlease.first_token``).
    """
    if packed is not None:
        return _packed_attention(module, query, key, value, scaling, dropout, packed,
                                 first_tokens)  # fmt: skip
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    out, weights = _attend(module, query, key, value, mask, scaling, dropout)
    return out.transpose(1, 2).contiguous(), weights


def _attend(module, query, key, value, mask, scaling, dropout):
    """``dropout(softmax(scaling * query key^T + mask)) value`` over the last two dimensions:
    ``(output (..., L, D), probabilities)``."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(-2, -1))
    p = dropout if module.training else 0.0
    fast = type(getattr(module, "dropout", None)) is not nn.Dropout  # aten's where not swapped
    if p > 0 and fast and _fused(scores):
        weights = cpp_backend.softmax_dropout(scores, mask, scaling, p)
    else:
        weights = scores * scaling
        if mask is not None:
            weights = weights + mask
        weights = (_dropout if fast else F.dropout)(torch.softmax(weights, dim=-1), p,
                                                    module.training)  # fmt: skip
    return torch.matmul(weights.to(value.dtype), value), weights


def _packed_attention(module, query, key, value, scaling, dropout, packed, first_tokens=False):
    """The attention of a packed batch (one row of tokens; queries, keys and values as BERT
    passes them, ``(1, heads, tokens, head_dim)``): per bucket of rows of about the same length
    (``Packed.buckets``, whichever clients' rows they are), a padded contiguous ``(heads, rows,
    span, head_dim)`` block (the GEMMs need no copy of it), attended, the outputs gathered back;
    returns ``(1, tokens, heads, head_dim)``, contiguous (BERT's reshape of it is a view). With
    ``first_tokens`` the queries are the sequences' first tokens (``(1, heads, sequences,
    head_dim)``, batch order), one a row of each block, and it returns ``(1, sequences, heads,
    head_dim)``."""
    keys, values = (packed.blocks(t[0].transpose(0, 1)) for t in (key, value))
    if first_tokens:
        queries, unblock = packed.first_blocks(query[0]), packed.first_unblock
    else:
        queries, unblock = packed.blocks(query[0].transpose(0, 1)), packed.unblock
    parts = []
    for bucket, q, k, v in zip(packed.buckets, queries, keys, values):
        out, _ = _attend(module, q, k, v, bucket.key_mask.to(q.dtype), scaling, dropout)
        parts.append(out)
    return unblock(parts)[None], None


def _fused(scores: torch.Tensor) -> bool:
    """Whether the attention's scaling, mask, softmax and dropout can run as one compiled op."""
    fused_dtype = scores.dtype in (torch.float32, torch.bfloat16)
    return scores.is_cpu and fused_dtype and available() and not torch.compiler.is_compiling()


_registered = False


def register_attention() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTENTION, eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)  # eager's additive mask
    _registered = True


def attention_dropout(config) -> float:
    """The dropout probability a Hugging Face config gives its attention probabilities."""
    for key in ("attention_probs_dropout_prob", "attention_dropout"):
        value = getattr(config, key, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


def use_fast_dropout(model: nn.Module, enable: bool = True) -> int:
    """Swap every ``nn.Dropout`` of ``model`` for :class:`PhiloxDropout` and, for a model on the
    CPU whose attention probabilities have dropout, its ``eager`` or ``sdpa`` attention for
    ``fedlease_eager`` (CPU SDPA draws its dropout with aten: a MiniLM fp32 step with dropout
    measured 13 % faster this way, the same without dropout); MoE-LoRA layers draw their masks
    inside the ``cpp`` op. ``enable=False`` undoes it: ``nn.Dropout``, the attention the model
    had, aten's dropout in the layers. In place; returns how many dropout modules it swapped."""
    swapped = 0
    want, other = (PhiloxDropout, nn.Dropout) if enable else (nn.Dropout, PhiloxDropout)
    for module in model.modules():
        if type(module) is other:
            module.__class__ = want  # same attributes (p, inplace), other forward
            swapped += 1
    for module in model.modules():
        if isinstance(module, MoELoRALinear):
            module.fast_dropout = enable
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    on_cpu = all(p.is_cpu for p in model.parameters())
    if enable and impl in ("eager", "sdpa") and on_cpu and attention_dropout(config) > 0:
        register_attention()
        model._attention_before_fast_dropout = impl
        model.set_attn_implementation(ATTENTION)
    elif not enable and impl == ATTENTION:
        model.set_attn_implementation(getattr(model, "_attention_before_fast_dropout", "eager"))
    return swapped
