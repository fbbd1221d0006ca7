"""The last encoder layer for the first token only, in models whose head reads nothing else.

A BERT-family sequence classifier reads one token of its encoder's output: the pooler takes the
first (``[CLS]``) token's last hidden state. Every other token's last layer (its query, the
attention output's projection, the feed-forward layers, their backward) is computed and thrown
away: in MiniLM's six layers, about 14 % of the frozen GEMMs' forward and backward. With
:func:`use_first_token_output` the last layer computes the first token's query, attention and
feed-forward only (keys and values still from every token, which the first attends to), so the
head's logits and every gradient are the full model's up to rounding; the dropout masks of that
layer differ (fewer elements draw them), their distribution does not.

The encoder's ``last_hidden_state`` is then ``(batch, 1, hidden)``: the first token's. A call
asking for the hidden states or attentions of every layer gets the full last layer.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
from torch import nn

from .hooks import remove_hooks
from .layer import MoELoRALinear

SUPPORTED = ("bert",)  # BertLayer's structure
HEADS = ("BertForSequenceClassification",)  # heads that read only the pooler's first token


def unsupported(model: nn.Module) -> str | None:
    """Why the first-token last layer does not apply to ``model``, or None when it does."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED or getattr(config, "is_decoder", False):
        return f"model type {kind!r} is not one of {list(SUPPORTED)} (encoders only)"
    if type(model).__name__ not in HEADS:
        return f"{type(model).__name__} is not one of {list(HEADS)} (its head may read every token)"
    base = model.base_model
    if getattr(base, "pooler", None) is None or not hasattr(base, "encoder"):
        return f"{type(model).__name__} has no pooler reading the first token"
    return None


def use_first_token_output(model: nn.Module, enable: bool = True) -> nn.Module:
    """Make the last encoder layer of ``model`` (a BERT-family sequence classifier) compute the
    first token only (see the module's text); ``enable=False`` undoes it. In place; returns
    ``model``. A deep copy of the model keeps it."""
    why = unsupported(model)
    if why is not None:
        raise ValueError(f"cannot compute the first token only: {why}")
    base = model.base_model
    last = base.encoder.layer[-1]
    last.__dict__.pop("forward", None)
    remove_hooks(base, [_note_wants, _clear_wants])
    if enable:
        last.forward = types.MethodType(_first_token_layer, last)
        base.register_forward_pre_hook(_note_wants, with_kwargs=True)
        base.register_forward_hook(_clear_wants)
    return model


def first_token_only(layer: nn.Module) -> bool:
    """Whether ``layer`` (an encoder layer) computes only the first token in this call."""
    return "forward" in layer.__dict__ and not layer.__dict__.get("_every_token", False)


def _note_wants(base: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the base model: a call asking for every layer's outputs gets the full
    last layer."""
    keys = ("output_hidden_states", "output_attentions")
    wants = any(kwargs.get(k) or getattr(base.config, k, False) for k in keys)
    base.encoder.layer[-1]._every_token = bool(wants)


def _clear_wants(base: nn.Module, args: tuple, output):
    base.encoder.layer[-1].__dict__.pop("_every_token", None)


def _first_token_layer(layer, hidden_states, attention_mask=None, encoder_hidden_states=None,
                       encoder_attention_mask=None, cache=None, **kwargs):  # fmt: skip
    """BertLayer's forward with only the first token's query, attention and feed-forward (keys
    and values from every token). Packed inputs (``fedlease.packing``): the first token of each
    of the packed row's sequences."""
    if not first_token_only(layer) or encoder_hidden_states is not None or cache is not None:
        return type(layer).forward(layer, hidden_states, attention_mask, encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask, cache=cache,
                                   **kwargs)  # fmt: skip
    packed = kwargs.get("packed")
    first = hidden_states[:, :1] if packed is None else hidden_states[:, packed.firsts()]
    context = _first_token_attention(layer.attention.self, first, hidden_states, attention_mask,
                                     packed, kwargs)  # fmt: skip
    attended = layer.attention.output(context, first)
    return layer.feed_forward_chunk(attended)


def _first_token_attention(module, first, hidden_states, attention_mask, packed, kwargs):
    """The self-attention's output ``(batch or 1, first tokens, hidden)`` for the ``first``
    tokens' queries over every token's keys and values."""

    def heads(t):  # (..., tokens, hidden) -> (..., heads, tokens, head_dim)
        return t.view(*t.shape[:-1], -1, module.attention_head_size).transpose(1, 2)

    with _equal_shares(module.query, packed):
        query = heads(module.query(first))
    key, value = heads(module.key(hidden_states)), heads(module.value(hidden_states))
    if packed is None and attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :1]
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    attend = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation,
                                                   eager_attention_forward)  # fmt: skip
    if packed is not None:
        kwargs = {**kwargs, "first_tokens": True}
    dtype = query.dtype
    with _float32_on_cpu(query) as cast:
        out, _ = attend(module, cast(query), cast(key), cast(value), attention_mask,
                        scaling=module.scaling,
                        dropout=module.dropout.p if module.training else 0.0, **kwargs)  # fmt: skip
    return out.to(dtype).reshape(*first.shape[:-1], -1)


@contextmanager
def _float32_on_cpu(query: torch.Tensor):
    """Inside: ``cast`` makes a CPU bf16 tensor float32, with autocast off. The one-query
    products (batches of 1 x d by d x keys) have shapes no other layer uses, and every new shape
    of a bf16 ``bmm`` costs oneDNN a primitive (0.4-1 ms, ten times its work); float32's GEMMs
    (MKL) have no such cost."""
    if not (query.is_cpu and query.dtype == torch.bfloat16):
        yield lambda t: t
        return
    with torch.autocast("cpu", enabled=False):
        yield lambda t: t.float()


@contextmanager
def _equal_shares(query: nn.Module, packed):
    """Inside: a client-stacked MoE-LoRA query layer takes the packed first tokens in equal
    shares (each client's sequences), not the packed row's token shares."""
    if not isinstance(query, MoELoRALinear) or packed is None:
        yield
        return
    shares, query.token_shares = query.token_shares, None
    try:
        yield
    finally:
        query.token_shares = shares
