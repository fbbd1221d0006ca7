"""Padding-free batches for BERT-family encoders: every linear layer sees only real tokens.

A batch padded to its longest sequence spends the frozen model's GEMMs, the MoE-LoRA layers and
every element-wise op on padding: on GLUE's mix of short sentences (SST-2, median 13 tokens) and
sentence pairs (QNLI, MRPC, RTE, about 50) a batch of 16 holds 1.8 padded tokens per real one.
:func:`use_packing` makes the model's base (``BertModel``) drop them: its inputs become one row
of the batch's real tokens (position and token-type ids kept), only the attention goes back to
the padded layout (``fedlease_eager`` scatters queries, keys and values into it and gathers its
output), and the encoder's output is padded again, so the pooler, the head and every caller see
the shapes they always did. Results equal the padded model's up to rounding; dropout masks
differ (other elements draw them).

A model whose MoE-LoRA layers hold several clients (``fedlease.clients``) gets each client's
share of the packed tokens (its rows' real tokens) set on the layers for the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .dropout import ATTENTION, register_attention
from .layer import MoELoRALinear

PACKABLE = ("bert",)  # absolute positions from 0, token types, [CLS] pooling


@dataclass(frozen=True)
class Packed:
    """Where a padded batch's real tokens are: ``index`` their places in the flattened
    ``(batch, length)`` layout, in order (the packed row, then ``tokens - len(index)`` filler
    tokens that round its length, see :func:`row_length`); ``span`` the attention's block length
    (``length`` rounded up to a multiple of 8), ``slots`` the real tokens' places in the flattened
    ``(batch, span)`` block, ``key_mask`` its additive key mask ``(batch, 1, 1, span)``."""

    index: torch.Tensor
    batch: int
    length: int
    tokens: int
    span: int
    slots: torch.Tensor
    key_mask: torch.Tensor

    def pad(self, tokens: torch.Tensor) -> torch.Tensor:
        """Packed ``(tokens, ...)`` -> ``(batch, length, ...)``: the real tokens at their places,
        zeros in the padding."""
        return _scatter(tokens[: len(self.index)], self.index, self.batch, self.length)

    def block(self, tokens: torch.Tensor) -> torch.Tensor:
        """Packed ``(tokens, ...)`` -> the attention's ``(batch, span, ...)`` block."""
        return _scatter(tokens[: len(self.index)], self.slots, self.batch, self.span)

    def unblock(self, rows: torch.Tensor) -> torch.Tensor:
        """The attention's ``(batch, span, ...)`` block -> packed ``(tokens, ...)`` (zeros for
        the fillers)."""
        real = rows.reshape(-1, *rows.shape[2:]).index_select(0, self.slots)
        fillers = real.new_zeros(self.tokens - len(self.index), *real.shape[1:])
        return torch.cat([real, fillers])


def _scatter(tokens: torch.Tensor, places: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    rows = tokens.new_zeros(batch * length, *tokens.shape[1:])
    return rows.index_copy(0, places, tokens).view(batch, length, *tokens.shape[1:])


def row_length(tokens: int) -> int:
    """The packed row's length for ``tokens`` real ones: rounded up to a multiple of 1/32 of its
    power of two (at least 8). Every new GEMM shape costs oneDNN a primitive (about 1 ms each on
    a Xeon with AMX, 15-20 a step); unrounded, nearly every step had new ones."""
    step = max(8, 1 << max(0, tokens.bit_length() - 5))
    return -(-tokens // step) * step


def packable(model: nn.Module) -> str | None:
    """Why ``model`` cannot be packed, or None when it can."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in PACKABLE or getattr(config, "is_decoder", False):
        return f"model type {kind!r} is not one of {list(PACKABLE)} (encoders only)"
    if not hasattr(model.base_model, "encoder"):
        return f"{type(model.base_model).__name__} has no encoder"
    return None


def use_packing(model: nn.Module, enable: bool = True) -> nn.Module:
    """Make ``model`` (a BERT-family encoder, see :data:`PACKABLE`) skip padding tokens in every
    forward whose ``attention_mask`` pads on the right; its attention becomes ``fedlease_eager``.
    ``enable=False`` undoes it (the attention stays ``fedlease_eager``: eager's computation). In
    place; returns ``model``. The hooks keep no state of their own, so a deep copy of the model
    packs as the model does."""
    why = packable(model)
    if why is not None:
        raise ValueError(f"cannot pack sequences: {why}")
    base = model.base_model
    for hooks in (base._forward_pre_hooks, base.encoder._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn in (_pack_inputs, _pad_output)]:
            del hooks[key]
            base._forward_pre_hooks_with_kwargs.pop(key, None)
    if enable:
        register_attention()
        if model.config._attn_implementation != ATTENTION:
            model.set_attn_implementation(ATTENTION)
        base.register_forward_pre_hook(_pack_inputs, with_kwargs=True)
        base.encoder.register_forward_hook(_pad_output)
    return model


def packs(model: nn.Module) -> bool:
    """Whether ``model`` skips padding tokens (:func:`use_packing`)."""
    base = getattr(model, "base_model", None)
    return base is not None and _pack_inputs in base._forward_pre_hooks.values()


def plan(attention_mask: torch.Tensor) -> Packed | None:
    """The packing of a batch with this ``(batch, length)`` 0/1 mask, or None when it has no
    padding or pads other than on the right (then the batch runs as it is)."""
    batch, length = attention_mask.shape
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    if int(lengths.sum()) == keep.numel():
        return None
    right = torch.arange(length, device=keep.device) < lengths[:, None]
    if not torch.equal(keep, right):
        return None
    index = keep.flatten().nonzero().squeeze(1)
    span = -(-length // 8) * 8
    slots = index // length * span + index % length
    pads = torch.arange(span, device=keep.device) >= lengths[:, None]
    key_mask = torch.zeros(pads.shape, device=keep.device).masked_fill_(pads, torch.finfo().min)
    real = len(index)
    return Packed(index, batch, length, row_length(real), span, slots, key_mask[:, None, None])


def _pack_inputs(base: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the base model: its padded inputs as one row of real tokens."""
    args, kwargs = _as_kwargs(args, kwargs)
    ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    wants_more = kwargs.get("output_hidden_states") or kwargs.get("output_attentions")
    if ids is None or mask is None or mask.dim() != 2 or wants_more:
        return None
    packed = plan(mask)
    if packed is None:
        return None
    base.encoder._packed = packed
    _set_shares(base, mask, packed)
    kwargs.update(_packed_inputs(kwargs, packed), packed=packed)
    return args, kwargs


def _pad_output(encoder: nn.Module, args: tuple, output):
    """Forward hook of the encoder: its output in the padded layout again."""
    packed = encoder.__dict__.pop("_packed", None)
    if packed is None:
        return None
    for layer in encoder.modules():
        if isinstance(layer, MoELoRALinear):
            layer.token_shares = None
    output.last_hidden_state = packed.pad(output.last_hidden_state[0])
    return output


def _as_kwargs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's positional input ids as a keyword (the base's first parameter)."""
    if args:
        kwargs = {"input_ids": args[0], **kwargs}
        args = args[1:]
    return args, kwargs


def _packed_inputs(kwargs: dict, packed: Packed) -> dict:
    """input_ids, token_type_ids, position_ids of the real tokens and the fillers (id 0, position
    0, type 0) as one row, and the attention block's additive key mask (a 4-d mask, which the
    model passes to the attention as it is)."""
    ids = kwargs["input_ids"]
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(packed.length, device=ids.device).expand(packed.batch, -1)
    fillers = ids.new_zeros(packed.tokens - len(packed.index))

    def row(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.flatten()[packed.index], fillers])[None]

    out = {"input_ids": row(ids), "position_ids": row(positions)}
    types = kwargs.get("token_type_ids")
    if types is not None:
        out["token_type_ids"] = row(types)
    out["attention_mask"] = packed.key_mask
    return out


def _set_shares(base: nn.Module, mask: torch.Tensor, packed: Packed) -> None:
    """Each active client's real tokens (the fillers with the last), on every MoE-LoRA layer that
    holds several clients (their rows come client after client, in equal shares)."""
    layers = [m for m in base.modules() if isinstance(m, MoELoRALinear) and m.clients is not None]
    if layers:
        shares = mask.view(len(layers[0].active), -1).sum(1).tolist()
        shares[-1] += packed.tokens - len(packed.index)
        for layer in layers:
            layer.token_shares = shares
