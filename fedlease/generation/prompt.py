"""The Alpaca-style prompt (FedDPA's ``alpaca_short``) and training examples whose labels cover
only the response: the prompt's positions are ``IGNORE_INDEX``, which the loss skips."""

from __future__ import annotations

from ..data.tokenize import IGNORE_INDEX

TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
TEMPLATE_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def prompt_text(instruction: str, input_text: str = "") -> str:
    """What the model sees before its answer."""
    if input_text:
        return TEMPLATE_INPUT.format(instruction=instruction, input=input_text)
    return TEMPLATE.format(instruction=instruction)


def prompt_tokens(tokenizer, row: dict, max_len: int) -> list[int]:
    """The prompt's tokens as decoding starts from them: its last ``max_len`` tokens (where
    "### Response:" stands)."""
    return tokenizer(prompt_text(row["instruction"], row.get("input", "")))["input_ids"][-max_len:]


def encode_example(tokenizer, row: dict, max_len: int) -> dict[str, list[int]]:
    """``input_ids`` (prompt, response, EOS) and ``labels`` (``IGNORE_INDEX`` over the prompt, the
    response and EOS after it). Too long for ``max_len``: the response keeps up to ``max_len - 1``
    tokens and the prompt keeps its end (where "### Response:" stands)."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    text = prompt_text(row["instruction"], row.get("input", ""))
    prompt = tokenizer(text)["input_ids"]
    # the response's tokens as the tokenizer cuts them in context (the prompt ends in a newline)
    full = tokenizer(text + row["output"], add_special_tokens=False)["input_ids"]
    prefix = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    response = full[prefix:]
    if tokenizer.eos_token_id is not None:
        response = [*response, tokenizer.eos_token_id]
    response = response[: max_len - 1]
    prompt = prompt[-(max_len - len(response)) :]
    return {"input_ids": prompt + response,
            "labels": [IGNORE_INDEX] * len(prompt) + response}  # fmt: skip
