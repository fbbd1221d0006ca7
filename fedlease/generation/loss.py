"""A causal LM's next-token loss over its answers, with logits for the answer tokens only.

An instruction-tuning batch has targets only where the answer is (in ``make flan-demo``'s clients
a quarter of the tokens), but the model's own forward puts every position through the output
embedding (SmolLM2: 576 x 49,152, about a fifth of its GEMMs a token, forward and backward) and
the loss takes a float32 log-softmax over the vocabulary at every position. Here the decoder runs
as usual and only the positions with a target go through the output embedding and the loss:
losses and gradients equal the model's own up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokenize import IGNORE_INDEX

# Causal LMs whose logits are their output embedding of the decoder's last hidden state and
# nothing more (transformers' forward: ``logits = self.lm_head(hidden_states)``; no scaling or
# soft-capping, as Gemma 2's or Cohere's have).
PLAIN_HEADS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
               "GemmaForCausalLM", "Phi3ForCausalLM")  # fmt: skip


def answers_only(model: nn.Module) -> bool:
    """Whether :func:`answer_losses` can compute ``model``'s logits at the targets alone: a class
    of ``PLAIN_HEADS`` whose output embedding is a plain ``nn.Linear`` (not adapted)."""
    if type(model).__name__ not in PLAIN_HEADS:
        return False
    return type(model.get_output_embeddings()) is nn.Linear


def answer_losses(model: nn.Module, batch: dict[str, torch.Tensor], parts: int = 1,
                  all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per part of ``batch`` (``parts`` equal runs of its rows, e.g. clients in lockstep): the
    summed next-token cross-entropy over the positions with a target (``labels`` shifted by one,
    ``IGNORE_INDEX`` elsewhere: transformers' causal LM loss before its mean) and how many
    positions that sums. Logits for the targets only where :func:`answers_only` allows, for every
    position with ``all_logits`` (the model's own forward)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    keep = targets != IGNORE_INDEX
    if all_logits or not answers_only(model):
        logits = model(**inputs).logits[keep]
    else:
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        logits = model.get_output_embeddings()(hidden[keep])
    with torch.autocast(logits.device.type, enabled=False):
        per_token = F.cross_entropy(logits.float(), targets[keep], reduction="none")
    part = keep.nonzero()[:, 0] // (targets.shape[0] // parts)
    sums = per_token.new_zeros(parts).index_add_(0, part, per_token)
    return sums, keep.view(parts, -1).sum(1)


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                all_logits: bool = False) -> torch.Tensor:  # fmt: skip
    """The mean next-token cross-entropy over ``batch``'s targets (transformers' causal LM
    ``loss``; 0 where it has none)."""
    sums, counts = answer_losses(model, batch, 1, all_logits)
    return sums[0] / counts[0].clamp_min(1)
