"""Instruction tuning of causal LMs: prompts with response-only labels, batched greedy decoding,
ROUGE. The pieces the generation setting (FLAN tasks) is built from."""

from .decode import greedy_generate, greedy_generate_ids
from .prompt import IGNORE_INDEX, encode_example, prompt_text, prompt_tokens
from .rouge import rouge_scores

__all__ = [
    "IGNORE_INDEX",
    "encode_example",
    "greedy_generate",
    "greedy_generate_ids",
    "prompt_text",
    "prompt_tokens",
    "rouge_scores",
]
