"""A generation client's held-out score: greedy answers to its test prompts, ROUGE against the
references, and the teacher-forced loss of the reference answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.tokenize import Encoded
from .decode import greedy_generate_ids
from .loss import answer_losses
from .rouge import rouge_scores


@dataclass(frozen=True)
class Decoding:
    """How answers are decoded: the tokenizer (ids to text, pad and EOS ids) and the budget."""

    tokenizer: object
    max_new_tokens: int

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id


@torch.no_grad()
def evaluate_generation(model, data: Encoded, decoding: Decoding, batch_size: int) -> dict:
    """ROUGE-1/2/L (fractions) of the greedy answers to ``data``'s prompts and ``eval_loss`` (mean
    token cross-entropy of the reference answers, teacher-forced)."""
    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        batch = {k: v.to(device) for k, v in data.batch(idx, decoding.pad_id).items()}
        sums, counts = answer_losses(model, batch)
        loss_sum += sums.item()
        tokens += int(counts.item())
    ids = greedy_generate_ids(model, data.prompts, decoding.max_new_tokens, decoding.pad_id,
                              decoding.eos_id, batch_size)  # fmt: skip
    answers = [decoding.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]
    return {**rouge_scores(answers, data.references), "eval_loss": loss_sum / max(tokens, 1)}
