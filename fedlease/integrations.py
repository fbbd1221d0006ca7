"""Hooks for training loops that other projects use (Hugging Face ``Trainer``).

``Trainer.save_model`` and its checkpoints store the whole model's state dict, in which every
injected layer's frozen weight sits under ``<name>.base.weight``: ``from_pretrained`` of the
original class would not find those weights and would initialise the targeted layers afresh.
``SaveAdapterCallback`` writes what does reload, the adapter in fedlease's format, next to each
checkpoint: ``inject_moe_lora`` on a fresh model and ``load_adapter`` restore the trained model.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from .adapter_io import save_adapter

ADAPTER_DIR = "fedlease_adapter"


class SaveAdapterCallback(TrainerCallback):
    """``Trainer(..., callbacks=[SaveAdapterCallback()])``: every checkpoint Trainer saves gets
    ``checkpoint-<step>/fedlease_adapter/``, and the end of training
    ``<output_dir>/fedlease_adapter/`` (``adapter_model.safetensors`` + ``adapter_config.json``,
    with ``extra`` merged into the config)."""

    def __init__(self, extra: dict | None = None) -> None:
        self.extra = extra

    def on_save(self, args, state, control, model=None, **kwargs):
        save_adapter(model, Path(args.output_dir) / f"checkpoint-{state.global_step}" / ADAPTER_DIR,
                     self.extra)  # fmt: skip

    def on_train_end(self, args, state, control, model=None, **kwargs):
        save_adapter(model, Path(args.output_dir) / ADAPTER_DIR, self.extra)
