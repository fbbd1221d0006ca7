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

A model whose MoE-LoRA layers hold several clients (``fedlease.clients``) packs each client's
rows as a segment of its own (its attention block too) and gets each client's share of the
packed tokens set on the layers for the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .dropout import ATTENTION, register_attention
from .layer import MoELoRALinear

PACKABLE = ("bert",)  # absolute positions from 0, token types, [CLS] pooling


@dataclass(frozen=True)
class Segment:
    """Rows of the batch (a client's share) packed together: their ``real`` tokens, then fillers
    up to ``tokens`` (:func:`row_length`), are ``start:start + tokens`` of the packed row. For
    the attention they are a padded block of ``span`` (their longest, rounded up to a multiple
    of 8): ``slots`` their real tokens' places in the flattened ``(rows, span)`` block,
    ``key_mask`` its additive key mask ``(1, rows, 1, span)`` (the block holds heads first)."""

    start: int
    real: int
    tokens: int
    rows: int
    span: int
    slots: torch.Tensor
    key_mask: torch.Tensor

    def block(self, heads: torch.Tensor) -> torch.Tensor:
        """This segment's ``(heads, tokens, d)`` part of the packed row -> its
        ``(heads, rows, span, d)`` block."""
        mine = heads[:, : self.real]
        block = _scatter(mine, 1, self.slots, self.rows * self.span)
        return block.view(-1, self.rows, self.span, heads.shape[2])

    def unblock(self, block: torch.Tensor) -> torch.Tensor:
        """This segment's ``(heads, rows, span, d)`` block -> its ``(heads, tokens, d)`` (zero
        fillers)."""
        flat = block.reshape(block.shape[0], -1, block.shape[3])
        real = flat.index_select(1, self.slots)
        fillers = real.new_zeros(real.shape[0], self.tokens - self.real, real.shape[2])
        return torch.cat([real, fillers], 1)


@dataclass(frozen=True)
class Packed:
    """A padded ``(batch, length)`` batch as one row of tokens, segment after segment: ``source``
    gives each of the row's tokens its place in the flattened batch (``batch * length`` for a
    filler: id 0, position 0, type 0), ``real`` the places of the real tokens in the row."""

    batch: int
    length: int
    segments: tuple[Segment, ...]
    source: torch.Tensor
    real: torch.Tensor

    def row(self, t: torch.Tensor) -> torch.Tensor:
        """A ``(batch, length)`` input as the packed ``(1, tokens)`` row."""
        return torch.cat([t.flatten(), t.new_zeros(1)])[self.source][None]

    def pad(self, row: torch.Tensor) -> torch.Tensor:
        """Packed ``(tokens, ...)`` -> ``(batch, length, ...)``: the real tokens at their places,
        zeros in the padding."""
        rows = _scatter(row.index_select(0, self.real), 0, self.source[self.real],
                        self.batch * self.length)  # fmt: skip
        return rows.view(self.batch, self.length, *row.shape[1:])


def _scatter(src: torch.Tensor, dim: int, places: torch.Tensor, size: int) -> torch.Tensor:
    """Zeros of ``src``'s shape but ``size`` along ``dim``, with ``src``'s slices at ``places``
    (in place into the fresh zeros: no copy of them)."""
    shape = list(src.shape)
    shape[dim] = size
    return src.new_zeros(shape).index_copy_(dim, places, src)


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


def plan(attention_mask: torch.Tensor, shares: int = 1) -> Packed | None:
    """The packing of a batch with this ``(batch, length)`` 0/1 mask whose rows come in ``shares``
    equal shares (clients; each a segment of its own), or None when it has no padding, pads other
    than on the right or has an empty row (then the batch runs as it is)."""
    batch, length = attention_mask.shape
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    if int(lengths.sum()) == keep.numel():
        return None
    right = torch.arange(length, device=keep.device) < lengths[:, None]
    if not torch.equal(keep, right) or int(lengths.min()) == 0:
        return None
    segments, sources, start = [], [], 0
    for i, part in enumerate(keep.view(shares, -1, length)):
        seg = _segment(part, start)
        places = part.flatten().nonzero().squeeze(1) + i * part.numel()
        segments.append(seg)
        sources += [places, places.new_full((seg.tokens - seg.real,), keep.numel())]
        start += seg.tokens
    source = torch.cat(sources)
    real = (source < keep.numel()).nonzero().squeeze(1)
    return Packed(batch, length, tuple(segments), source, real)


def _segment(keep: torch.Tensor, start: int) -> Segment:
    """The segment of the rows whose real tokens ``keep`` marks, at ``start`` of the row."""
    lengths = keep.sum(1)
    real = int(lengths.sum())
    span = -(-int(lengths.max()) // 8) * 8
    block = torch.arange(span, device=keep.device) < lengths[:, None]
    slots = block.flatten().nonzero().squeeze(1)
    mask = torch.zeros(block.shape, device=keep.device).masked_fill_(~block, torch.finfo().min)
    return Segment(start, real, row_length(real), len(lengths), span, slots, mask[None, :, None])


def _pack_inputs(base: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the base model: its padded inputs as one row of real tokens."""
    args, kwargs = _as_kwargs(args, kwargs)
    ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    wants_more = kwargs.get("output_hidden_states") or kwargs.get("output_attentions")
    if ids is None or mask is None or mask.dim() != 2 or wants_more:
        return None
    layers = [m for m in base.modules() if isinstance(m, MoELoRALinear) and m.clients is not None]
    packed = plan(mask, len(layers[0].active) if layers else 1)
    if packed is None:
        return None
    base.encoder._packed = packed
    shares = [seg.tokens for seg in packed.segments]  # each client's tokens, its fillers too
    for layer in layers:
        layer.token_shares = shares
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
    """input_ids, token_type_ids, position_ids as the packed row, and a 4-d placeholder mask (the
    model passes a 4-d mask to the attention as it is, instead of building a tokens x tokens one;
    the attention uses the segments' own)."""
    ids = kwargs["input_ids"]
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(packed.length, device=ids.device).expand(packed.batch, -1)
    out = {"input_ids": packed.row(ids), "position_ids": packed.row(positions)}
    types = kwargs.get("token_type_ids")
    if types is not None:
        out["token_type_ids"] = packed.row(types)
    out["attention_mask"] = ids.new_zeros(1, 1, 1, len(packed.source), dtype=torch.float32)
    return out
