"""PEFT LoRA adapters in and out: experts made from existing adapters, an expert served as one.

``export_expert(model, e, path)`` writes expert ``e`` of every MoE-LoRA layer (with the model's
trainable modules, e.g. its task head) as a standard PEFT LoRA adapter, built and saved by PEFT
itself: ``peft.PeftModel.from_pretrained(base, path)`` loads it with no code of ours and computes
exactly that expert's output (the layer with its gate forced onto ``e``).

``experts_from_peft(model, paths, config)`` injects MoE-LoRA layers whose experts are existing
PEFT LoRA adapters, leaving the router to train. Adapters of different rank are zero-padded to the
largest, and each adapter's own ``lora_alpha / r`` is folded into its B, so every expert computes
exactly what its adapter did.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .adapter_io import AdapterError
from .inject import MoELoRAConfig, _matches, inject_moe_lora, moe_lora_layers
from .layer import MoELoRALinear

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError(
            "PEFT adapters need the peft package: pip install 'fedlease[peft]'"
        ) from exc
    return peft


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every MoE-LoRA layer replaced by its frozen base linear."""
    plain = copy.deepcopy(model)
    for name in list(moe_lora_layers(plain)):
        parent_name, _, child = name.rpartition(".")
        parent = plain.get_submodule(parent_name) if parent_name else plain
        setattr(parent, child, getattr(parent, child).base)
    if hasattr(plain, "moe_lora_config"):
        del plain.moe_lora_config
    return plain


def export_expert(
    model: nn.Module, expert: int, directory: str | Path, base_model: str | None = None
) -> Path:
    """Write expert ``expert`` of ``model`` (and its trainable modules) as a PEFT LoRA adapter in
    ``directory``; ``base_model``: the name PEFT records (default: the model's own). Nothing is
    written when ``expert`` is out of range or the model has no MoE-LoRA layers."""
    peft = _peft()
    layers = moe_lora_layers(model)
    config = getattr(model, "moe_lora_config", None)
    if not layers or config is None:
        raise ValueError("the model has no MoE-LoRA layers (inject_moe_lora first)")
    m = next(iter(layers.values())).num_experts
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < m:
        raise ValueError(f"expert {expert!r} is out of range: the model has experts 0..{m - 1}")
    plain = plain_copy(model).float().cpu()
    lora = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        modules_to_save=list(config.trainable_modules) or None,
        bias="none",
    )
    wrapped = peft.get_peft_model(plain, lora)
    inner = wrapped.base_model.model
    with torch.no_grad():
        for name, layer in layers.items():
            target = inner.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A[expert])
            target.lora_B["default"].weight.copy_(layer.lora_B[expert])
        for name, module in model.named_modules():
            if name and _matches(name, list(config.trainable_modules)):
                wrapper = inner.get_submodule(name)
                if hasattr(wrapper, "modules_to_save"):
                    wrapper.modules_to_save["default"].load_state_dict(module.state_dict())
    name_or_path = base_model or getattr(getattr(model, "config", None), "_name_or_path", None)
    wrapped.peft_config["default"].base_model_name_or_path = name_or_path
    directory = Path(directory)
    wrapped.save_pretrained(str(directory))
    return directory


def read_peft_adapter(
    path: str | Path,
) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``(adapter_config, {module name: (A (r, in), B (out, r))})`` of a PEFT LoRA adapter;
    ``AdapterError`` naming the file for a missing or unreadable file or a non-LoRA adapter."""
    path = Path(path)
    cfg_path = path / PEFT_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"cannot read PEFT adapter config {cfg_path}: {exc}") from exc
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not a LoRA adapter")
    for flag in ("use_dora", "use_rslora"):
        if cfg.get(flag):
            raise AdapterError(f"{cfg_path}: {flag} adapters are not supported (plain LoRA only)")
    weights = next((path / w for w in PEFT_WEIGHTS if (path / w).exists()), None)
    if weights is None:
        raise AdapterError(f"{path}: no {PEFT_WEIGHTS[0]} (or {PEFT_WEIGHTS[1]})")
    try:
        if weights.suffix == ".safetensors":
            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, SafetensorError, RuntimeError) as exc:
        raise AdapterError(f"cannot read PEFT adapter weights {weights}: {exc}") from exc
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                module = key.removesuffix(suffix).removeprefix(PREFIX)
                pairs.setdefault(module, {})[part] = tensor.float()
    incomplete = sorted(m for m, p in pairs.items() if len(p) != 2)
    if not pairs or incomplete:
        raise AdapterError(
            f"{weights}: no complete lora_A/lora_B pairs"
            + (f" for {incomplete}" if incomplete else "")
        )
    return cfg, {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}


def experts_from_peft(
    model: nn.Module, paths: list[str | Path], config: MoELoRAConfig | None = None
) -> nn.Module:
    """Inject MoE-LoRA layers whose expert ``i`` is the PEFT LoRA adapter ``paths[i]``.

    ``config`` sets routing, dropout, trainable modules and the layers' ``alpha`` (default: that of
    the first adapter); ``num_experts``, ``rank`` and ``target_modules`` come from the adapters
    (the largest rank, the union of the targeted modules; a module an adapter leaves alone gets a
    zero expert). Routers start fresh. ``AdapterError`` naming the adapter and tensor when a file is
    missing, an adapter is not LoRA, or a tensor's shape does not fit this model."""
    if not paths:
        raise ValueError("experts_from_peft needs at least one adapter path")
    adapters = [read_peft_adapter(p) for p in paths]
    rank = max(int(cfg["r"]) for cfg, _ in adapters)
    modules = sorted({m for _, pairs in adapters for m in pairs})
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    base = config or MoELoRAConfig(routing="adaptive")
    alpha = base.alpha if config is not None else float(adapters[0][0]["lora_alpha"])
    full = replace(base, num_experts=len(paths), rank=rank, alpha=alpha, target_modules=targets)
    linears = dict(model.named_modules())
    for path, (_, pairs) in zip(paths, adapters):
        for module, (a, b) in pairs.items():
            target = linears.get(module)
            if not isinstance(target, nn.Linear):
                raise AdapterError(
                    f"adapter {path}: {module!r} is not a linear layer of {type(model).__name__}"
                )
            if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
                raise AdapterError(
                    f"adapter {path}: {module} has lora_A {tuple(a.shape)} / lora_B "
                    f"{tuple(b.shape)}, but the model's layer is {target.in_features} -> "
                    f"{target.out_features} (an adapter of another base model?)"
                )
    inject_moe_lora(model, full)
    layers = moe_lora_layers(model)
    scaling = alpha / rank
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.zero_()
            layer.lora_B.zero_()
        for e, (cfg, pairs) in enumerate(adapters):
            own = float(cfg["lora_alpha"]) / int(cfg["r"])
            for module, (a, b) in pairs.items():
                layer: MoELoRALinear = layers[module]
                r = a.shape[0]
                layer.lora_A[e, :r].copy_(a)
                layer.lora_B[e, :, :r].copy_(b * (own / scaling))
    return model


PEFT_FILES = ("README.md", "adapter_config.json", "adapter_model.safetensors")


def _check_writable(out: Path) -> None:
    """``AdapterError`` if ``out`` is a file or holds a file PEFT's ``save_pretrained`` would
    write (or, for README.md, edit): the export never replaces a user's file; others stay."""
    if out.exists() and not out.is_dir():
        raise AdapterError(f"--out {str(out)!r} is a file, not a directory")
    held = [name for name in PEFT_FILES if (out / name).exists()]
    if held:
        raise AdapterError(
            f"--out {str(out)!r} already holds {held[0]!r}, which the export "
            "would write over; choose a new or empty directory"
        )


def export_saved_expert(adapter_dir: str | Path, expert: int, out: str | Path) -> Path:
    """``export_expert`` for an adapter saved by ``fedlease`` (``save_adapter``, or a run's
    ``adapters/client<i>``): the base model, head size and MoE-LoRA config come from its
    ``adapter_config.json``. ``AdapterError`` naming the problem; nothing is written then."""
    from . import models
    from .adapter_io import (
        inject_saved,
        read_adapter_config,
        read_adapter_meta,
        saved_head_labels,
    )

    source, target = Path(adapter_dir).resolve(), Path(out).resolve()
    if target == source or source in target.parents:
        raise AdapterError(
            f"--out {str(out)!r} is the adapter {str(adapter_dir)!r} or inside it: "
            "the export would write over what it reads"
        )
    _check_writable(Path(out))
    meta = read_adapter_meta(adapter_dir)
    config = read_adapter_config(adapter_dir)
    if isinstance(expert, bool) or not 0 <= expert < config.num_experts:
        raise AdapterError(
            f"--expert {expert} is out of range: {adapter_dir} has experts "
            f"0..{config.num_experts - 1}"
        )
    name = meta.get("model", "minilm")
    model, _ = models.load(name, num_labels=saved_head_labels(adapter_dir, config, meta) or 2)
    inject_saved(model, config, adapter_dir)
    try:
        return export_expert(model, expert, out, base_model=models.model_path(name))
    except OSError as exc:  # a directory the system will not create or write
        raise AdapterError(f"--out {str(out)!r}: cannot write there ({exc.strerror})") from None
