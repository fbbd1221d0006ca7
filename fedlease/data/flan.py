"""FLAN instruction tasks from a local JSON Lines directory: ``<dir>/<task>/{train,test}.jsonl``,
one ``{"instruction", "input", "output", "task", "category"}`` object per line (the FLAN template
already applied to ``instruction``; ``input`` may be empty or absent)."""

from __future__ import annotations

import os
from pathlib import Path

from ..generation.prompt import encode_example, prompt_tokens
from .glue import DataError, read_json_lines, resolve_data_dir
from .tokenize import Encoded, Source

FLAN_DIR_ENV = "FEDLEASE_FLAN_DIR"
SPLITS = ("train", "test")


def resolve_flan_dir(data_dir: str | os.PathLike | None) -> Path:
    """The FLAN directory: the argument, else ``$FEDLEASE_FLAN_DIR``; there is no hub fallback."""
    path = resolve_data_dir(data_dir, FLAN_DIR_ENV, "FLAN data directory")
    if path is None:
        raise DataError(f"no FLAN data directory: give one or set ${FLAN_DIR_ENV} "
                        "(<dir>/<task>/{train,test}.jsonl)")  # fmt: skip
    return path


def flan_tasks(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The tasks present in the FLAN directory (sub-directories with a train split)."""
    root = resolve_flan_dir(data_dir)
    return sorted(p.name for p in root.iterdir() if (p / "train.jsonl").is_file())


def _check_row(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("instruction", "output"):
        if key not in row:
            raise DataError(f"{where}: missing key {key!r}")
    for key in ("instruction", "output", "input"):
        if key in row and not isinstance(row[key], str):
            raise DataError(f"{where}: key {key!r} must be a string, got {row[key]!r}")
    return {"instruction": row["instruction"], "input": row.get("input", ""),
            "output": row["output"], "category": str(row.get("category", ""))}  # fmt: skip


def load_flan_split(task: str, split: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The examples of one FLAN task's ``train`` or ``test`` split, each checked; errors name the
    task, or the file and line."""
    if split not in SPLITS:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    root = resolve_flan_dir(data_dir)
    if not (root / task).is_dir():
        raise DataError(f"unknown FLAN task {task!r} in {str(root)!r}; available: "
                        f"{', '.join(flan_tasks(root)) or 'none'}")  # fmt: skip
    return read_json_lines(root / task / f"{split}.jsonl", _check_row)


def encode_instructions(rows: list[dict], task: str, tokenizer, max_len: int) -> Encoded:
    """Prompt + response token lists with response-only labels for training, and each example's
    prompt tokens and reference answer for decoding and scoring."""
    examples = [encode_example(tokenizer, r, max_len) for r in rows]
    ids = [e["input_ids"] for e in examples]
    return Encoded(
        {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]},
        [e["labels"] for e in examples],
        prompts=[prompt_tokens(tokenizer, r, max_len) for r in rows],
        references=[r["output"] for r in rows],
    )


FLAN = Source(
    resolve_flan_dir,
    ("train", "test"),
    load_flan_split,
    lambda rows: [0] * len(rows),  # no classes: a uniform partition
    lambda task: 1,
    encode_instructions,
)
