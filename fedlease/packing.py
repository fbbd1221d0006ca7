"""Padding-free batches for BERT-family encoders: every linear layer sees only real tokens.

A batch padded to its longest sequence spends the frozen model's GEMMs, the MoE-LoRA layers and
every element-wise op on padding: on GLUE's mix of short sentences (SST-2, median 13 tokens) and
sentence pairs (QNLI, MRPC, RTE, about 50) a batch of 16 holds 1.8 padded tokens per real one.
:func:`use_packing` makes the model's base (``BertModel``) drop them: its inputs become one row
of the batch's real tokens (position and token-type ids kept), only the attention goes back to
a padded layout (``fedlease_eager`` scatters queries, keys and values into blocks of rows of
about the same length, :func:`bucket_spans`, and gathers its output), and the encoder's output is
padded again, so the pooler, the head and every caller see the shapes they always did. Results
equal the padded model's up to rounding; dropout masks differ (other elements draw them).

A model whose MoE-LoRA layers hold several clients (``fedlease.clients``) packs each client's
rows as a segment of its own and gets each client's share of the packed tokens set on the layers
for the forward; the attention, which holds no client's tensors, buckets all the clients' rows
together.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .dropout import ATTENTION, register_attention
from .first_token import first_token_only
from .hooks import remove_hooks
from .layer import MoELoRALinear

PACKABLE = ("bert",)  # absolute positions from 0, token types, [CLS] pooling


@dataclass(frozen=True)
class Segment:
    """Rows of the batch (a client's share) packed together: their ``real`` tokens, then fillers
    up to ``tokens`` (:func:`row_length`), are ``start:start + tokens`` of the packed row."""

    start: int
    real: int
    tokens: int


@dataclass(frozen=True)
class Bucket:
    """Rows of about the same length, whoever's they are, that attend as one padded block of
    ``rows`` x ``span`` tokens; ``key_mask`` is its additive key mask ``(1, rows, 1, span)`` (the
    block holds heads first)."""

    rows: int
    span: int
    key_mask: torch.Tensor


@dataclass(frozen=True)
class Packed:
    """A padded ``(batch, length)`` batch as one row of tokens, segment after segment: ``source``
    gives each of the row's tokens its place in the flattened batch (``batch * length`` for a
    filler: id 0, position 0, type 0), ``real`` the places of the real tokens in the row.

    For the attention the rows go to ``buckets`` (:func:`bucket_spans`): ``slots`` gives each
    token of the packed row its place in the buckets' blocks laid end to end (a filler: one of
    ``fillers`` places after them)."""

    batch: int
    length: int
    segments: tuple[Segment, ...]
    source: torch.Tensor
    real: torch.Tensor
    buckets: tuple[Bucket, ...]
    slots: torch.Tensor
    fillers: int
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # of derived indices

    def row(self, t: torch.Tensor) -> torch.Tensor:
        """A ``(batch, length)`` input as the packed ``(1, tokens)`` row."""
        return torch.cat([t.flatten(), t.new_zeros(1)])[self.source][None]

    def pad(self, row: torch.Tensor) -> torch.Tensor:
        """Packed ``(tokens, ...)`` -> ``(batch, length, ...)``: the real tokens at their places,
        zeros in the padding."""
        rows = _scatter(row.index_select(0, self.real), self.source[self.real],
                        self.batch * self.length)  # fmt: skip
        return rows.view(self.batch, self.length, *row.shape[1:])

    def blocks(self, heads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The packed row's ``(tokens, heads, d)`` (the projections' own layout) -> each bucket's
        contiguous ``(heads, rows, span, d)`` block (zeros in its padding), the blocks one
        buffer end to end, so the attention's GEMMs need no copy of them. One gather and one
        split; the backward is one gather too, whatever the number of buckets."""
        tokens, n, d = heads.shape
        units, inverse = self._units(n)
        flat = _Gather.apply(heads.reshape(tokens * n, d), inverse, units)
        sizes = [n * b.rows * b.span for b in self.buckets] + [n * self.fillers]
        return tuple(p.view(n, b.rows, b.span, d) for p, b in zip(flat.split(sizes), self.buckets))

    def unblock(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Each bucket's ``(heads, rows, span, d)`` block -> the packed row's ``(tokens, heads,
        d)``, contiguous (zeros for the fillers)."""
        n, d = blocks[0].shape[0], blocks[0].shape[3]
        flat = [b.reshape(-1, d) for b in blocks]
        flat.append(flat[0].new_zeros(n * self.fillers, d))
        units, inverse = self._units(n)
        return _Gather.apply(torch.cat(flat), units, inverse).view(-1, n, d)

    def firsts(self) -> torch.Tensor:
        """Each sequence's first token's place in the packed row, in batch order."""
        if "firsts" not in self.cache:
            source = self.source[self.real]
            self.cache["firsts"] = self.real[source % self.length == 0]
        return self.cache["firsts"]

    def first_blocks(self, heads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The sequences' first tokens' ``(heads, sequences, d)`` -> each bucket's ``(heads, rows,
        1, d)``, its rows in the order of :meth:`blocks`' rows."""
        order, _ = self._first_order()
        parts = heads.index_select(1, order).split([b.rows for b in self.buckets], dim=1)
        return tuple(p.unsqueeze(2) for p in parts)

    def first_unblock(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Each bucket's ``(heads, rows, 1, d)`` -> the sequences' ``(sequences, heads, d)``, in
        batch order."""
        _, back = self._first_order()
        return torch.cat(blocks, dim=1)[:, :, 0].index_select(1, back).transpose(0, 1)

    def _first_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequences bucket by bucket as :meth:`blocks` holds them (each one's first token
        opens its row there: sorting by that slot), and the inverse permutation."""
        if "first_order" not in self.cache:
            order = torch.argsort(self.slots[self.firsts()])
            self.cache["first_order"] = (order, torch.argsort(order))
        return self.cache["first_order"]

    def _units(self, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For ``heads`` heads: each (token, head) pair's row in the blocks laid end to end, the
        fillers' block last (``(tokens * heads,)``, token-major), and its inverse: each row's
        pair, or ``tokens * heads`` for the buckets' padding. A block of ``size`` slots holds
        head after head, so the token at slot ``s`` of the block starting at ``start`` is at
        ``heads * start + h * size + s - start``."""
        if ("units", heads) not in self.cache:
            sizes = torch.tensor([b.rows * b.span for b in self.buckets] + [self.fillers],
                                 device=self.slots.device)  # fmt: skip
            ends = sizes.cumsum(0)
            which = torch.bucketize(self.slots, ends, right=True)  # the block of each slot
            start, size = ends[which] - sizes[which], sizes[which]
            first = heads * start + self.slots - start
            h = torch.arange(heads, device=self.slots.device)
            units = (first[:, None] + h * size[:, None]).flatten()
            inverse = units.new_full((heads * int(ends[-1]),), len(units))
            inverse[units] = torch.arange(len(units), device=units.device)
            self.cache["units", heads] = (units, inverse)
        return self.cache["units", heads]


class _Gather(torch.autograd.Function):
    """``x``'s rows ``index`` (``len(x)``: a row of zeros) where each row of ``x`` is taken at
    most once (``back``: each of ``x``'s rows' place, or the zero row for a row not taken), so
    the backward is a gather by ``back`` too. On the CPU ``index_select``'s own backward (zero,
    then add) and ``index_copy_``'s scatter each took 2-3x a gather's time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, back: torch.Tensor):
        ctx.save_for_backward(back)
        return _rows(x, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (back,) = ctx.saved_tensors
        return _rows(grad, back), None, None


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x``'s rows ``index``, where ``len(x)`` stands for a row of zeros."""
    if len(index) > len(x):  # only an inverse, which covers the padding too, reaches past x
        x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    return x.index_select(0, index)


def _scatter(src: torch.Tensor, places: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` rows of zeros with ``src``'s rows at ``places`` (in place into the fresh zeros:
    no copy of them)."""
    return src.new_zeros(size, *src.shape[1:]).index_copy_(0, places, src)


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
    remove_hooks(base, [_pack_inputs])
    remove_hooks(base.encoder, [_pad_output])
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
        real = int(part.sum())
        seg = Segment(start, real, row_length(real))
        places = part.flatten().nonzero().squeeze(1) + i * part.numel()
        segments.append(seg)
        sources += [places, places.new_full((seg.tokens - seg.real,), keep.numel())]
        start += seg.tokens
    source = torch.cat(sources)
    real = (source < keep.numel()).nonzero().squeeze(1)
    buckets, slots, fillers = _attention_layout(keep, lengths, real, len(source))
    return Packed(batch, length, tuple(segments), source, real, buckets, slots, fillers)


SPAN_STEP = 8  # a bucket's span is a multiple of this
BUCKET_COST = 8192  # one more bucket's fixed cost, in score elements per head (rows x span^2)


def bucket_spans(lengths: list[int]) -> list[int]:
    """The spans of the buckets that rows of these lengths attend in: the partition of the rows,
    sorted by length, into runs padded to their longest (rounded up to :data:`SPAN_STEP`) with the
    least ``sum(rows * span^2) + BUCKET_COST * buckets``, each run's span, ascending. One bucket
    per client's batch wastes ``span^2 / length^2`` on every short row (2-6x on GLUE's tasks);
    a bucket per length costs a dozen small GEMMs and softmaxes more per layer."""
    rows_of = Counter(-(-n // SPAN_STEP) * SPAN_STEP for n in lengths)
    spans = sorted(rows_of)
    count = [rows_of[s] for s in spans]
    best, cut = [0.0] + [float("inf")] * len(spans), [0] * (len(spans) + 1)
    for j in range(1, len(spans) + 1):  # best[j]: the first j spans bucketed; cut[j]: last start
        rows = 0
        for i in range(j, 0, -1):
            rows += count[i - 1]
            cost = best[i - 1] + rows * spans[j - 1] ** 2 + BUCKET_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    tops, j = [], len(spans)
    while j > 0:
        tops.append(spans[j - 1])
        j = cut[j]
    return tops[::-1]


def _attention_layout(keep: torch.Tensor, lengths: torch.Tensor, real: torch.Tensor,
                      tokens: int) -> tuple[tuple[Bucket, ...], torch.Tensor, int]:  # fmt: skip
    """The buckets of the rows (``keep``: their real tokens, right-aligned ``lengths``), each
    token's place in them and the number of fillers (``real``: the real tokens' places in the
    packed row of ``tokens``)."""
    tops = torch.tensor(bucket_spans(lengths.tolist()), device=keep.device)
    which = torch.bucketize(lengths, tops)  # each row's bucket: the smallest top >= its length
    order = torch.sort(which, stable=True).indices  # rows bucket by bucket, in batch order within
    rows = torch.bincount(which, minlength=len(tops))
    sizes = rows * tops
    first = torch.cumsum(rows, 0) - rows  # each bucket's first place in ``order``
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=keep.device) - first[which[order]]
    starts = (torch.cumsum(sizes, 0) - sizes)[which] + rank * tops[which]  # each row's place
    slots, fillers = _slots(keep, starts, real, tokens, int(sizes.sum()))
    members = order.split(rows.tolist())
    buckets = tuple(Bucket(len(m), span, _key_mask(lengths[m], span))
                    for m, span in zip(members, tops.tolist()))  # fmt: skip
    return buckets, slots, fillers


def _slots(keep: torch.Tensor, starts: torch.Tensor, real: torch.Tensor, tokens: int,
           total: int) -> tuple[torch.Tensor, int]:  # fmt: skip
    """Each packed token's place: a real one's row start plus its column, a filler one of the
    places after the buckets' ``total``."""
    row, col = keep.nonzero(as_tuple=True)  # the real tokens in the packed row's order
    slots = torch.empty(tokens, dtype=torch.long, device=keep.device)
    slots[real] = starts[row] + col
    filler = torch.ones(tokens, dtype=torch.bool, device=keep.device)
    filler[real] = False
    fillers = tokens - len(real)
    slots[filler] = torch.arange(total, total + fillers, device=keep.device)
    return slots, fillers


def _key_mask(lengths: torch.Tensor, span: int) -> torch.Tensor:
    """The additive ``(1, rows, 1, span)`` key mask of rows of these lengths."""
    inside = torch.arange(span, device=lengths.device) < lengths[:, None]
    mask = torch.zeros(inside.shape, device=lengths.device)
    return mask.masked_fill_(~inside, torch.finfo().min)[None, :, None]


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
    out = output.last_hidden_state[0]
    first_only = first_token_only(encoder.layer[-1])
    output.last_hidden_state = out.view(packed.batch, 1, -1) if first_only else packed.pad(out)
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
