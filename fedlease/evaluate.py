"""Evaluate a saved adapter (e.g. one client's result of ``fedlease run``): accuracy on a GLUE
task's validation split, or, for a generation client, ROUGE of its greedy answers on a FLAN task's
test split."""

from __future__ import annotations

import torch

from . import models
from .adapter_io import (
    AdapterError,
    inject_saved,
    read_adapter_config,
    read_adapter_meta,
    saved_head_labels,
)
from .data import load_split, resolve_data_dir, task_spec
from .data.tokenize import encode
from .fl.client import evaluate_encoded


def evaluate_adapter(
    adapter_dir: str,
    task: str | None = None,
    samples: int | None = None,
    data_dir: str | None = None,
    batch_size: int = 64,
    backend: str = "auto",
    max_new_tokens: int | None = None,
) -> dict:
    """Accuracy (and F1 for MRPC/QQP) of the adapter in ``adapter_dir`` on the validation split
    of ``task`` (default: the task saved with the adapter), first ``samples`` examples; for an
    adapter saved by a generation run, ROUGE-1/2/L on the FLAN task's test split, decoding at most
    ``max_new_tokens`` (default: the run's) per example.

    Raises ``AdapterError`` (a ``ValueError``) naming the file or tensor when the adapter cannot
    be read or does not fit the model it names, ``DataError`` for data problems.
    """
    meta = read_adapter_meta(adapter_dir)
    config = read_adapter_config(adapter_dir)
    task = task or meta.get("task")
    if task is None:
        raise AdapterError(f"{adapter_dir}: the adapter names no task; pass --task")
    head = saved_head_labels(adapter_dir, config, meta)  # before any model is built
    if meta.get("task_type") == "generation":
        return _evaluate_generation(adapter_dir, meta, config, task, samples, data_dir,
                                    batch_size, backend, max_new_tokens)  # fmt: skip
    spec = task_spec(task)
    num_labels = head or spec.num_labels
    if spec.num_labels > num_labels:
        raise AdapterError(
            f"task {task!r} has {spec.num_labels} labels, the adapter's head in "
            f"{adapter_dir} {num_labels}: it cannot be evaluated on it"
        )
    torch.manual_seed(0)  # the head is loaded from the adapter: the seed only fixes the rest
    model, tokenizer = models.load(meta.get("model", "minilm"), num_labels=num_labels)
    adapted(model, config, adapter_dir, backend)
    rows = load_split(task, "validation", resolve_data_dir(data_dir))
    rows = rows[:samples] if samples else rows
    data = encode(rows, spec.text_fields, tokenizer, int(meta.get("max_seq_len", 128)))
    with torch.no_grad():
        result = evaluate_encoded(model, data, task, tokenizer.pad_token_id, batch_size)
    return {"task": task, "examples": len(rows), **result}


def adapted(model, config, adapter_dir, backend: str) -> None:
    """``model`` with the saved adapter's MoE-LoRA layers injected and loaded, in eval mode."""
    inject_saved(model, config, adapter_dir, backend)
    model.eval()


def _evaluate_generation(adapter_dir, meta, config, task, samples, data_dir, batch_size, backend,
                         max_new_tokens) -> dict:  # fmt: skip
    from .data.flan import encode_instructions, load_flan_split, resolve_flan_dir
    from .generation.score import Decoding, evaluate_generation

    budget = int(max_new_tokens or meta.get("max_new_tokens", 32))
    if budget < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {budget}")  # the saved one is checked
    rows = load_flan_split(task, "test", resolve_flan_dir(data_dir))
    rows = rows[:samples] if samples else rows
    model, tokenizer = models.load_causal(meta.get("model", "smollm2"))
    adapted(model, config, adapter_dir, backend)
    data = encode_instructions(rows, task, tokenizer, int(meta.get("max_seq_len", 256)))
    result = evaluate_generation(model, data, Decoding(tokenizer, budget), batch_size)
    return {"task": task, "examples": len(rows), **result}
