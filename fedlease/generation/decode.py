"""Greedy decoding in batches: prompts left-padded to a common length, the model's KV cache
reused step to step (``generate``), at most ``max_new_tokens`` each, stopping at EOS."""

from __future__ import annotations

import torch


def greedy_generate_ids(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int,
                        eos_id: int | None, batch_size: int = 16) -> list[list[int]]:  # fmt: skip
    """The generated token ids (EOS and what follows it dropped) for each prompt, in order.
    Batches are left-padded with ``pad_id`` and masked, so a prompt decodes as it would alone."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    device = next(model.parameters()).device
    out: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p) :] = 1
            with torch.no_grad():
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     use_cache=True, pad_token_id=pad_id, eos_token_id=eos_id,
                                     num_beams=1)  # fmt: skip
            for row in gen[:, width:].tolist():
                if eos_id is not None and eos_id in row:
                    row = row[: row.index(eos_id)]
                out.append(row)
    finally:
        model.train(was_training)
    return out


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int,
                    batch_size: int = 16) -> list[str]:  # fmt: skip
    """``greedy_generate_ids`` on text: the decoded answers, stripped."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = greedy_generate_ids(model, encoded, max_new_tokens, pad, tokenizer.eos_token_id,
                              batch_size)  # fmt: skip
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]
