"""Adapter weights in and out of a model: state dicts, and safetensors files on disk.

The adapter state of a model is every MoE-LoRA parameter (``lora_A``, ``lora_B``, ``router``)
plus the parameters of the config's ``trainable_modules``; the frozen model is never included.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .inject import MoELoRAConfig, _matches, inject_moe_lora, moe_lora_layers


class AdapterError(ValueError):
    """A saved (or PEFT) adapter that cannot be read, does not fit the model it names, or cannot
    be written where asked; the message names the file, tensor or flag. A ``ValueError``, as
    these errors were before the type existed."""


WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# what a run saves beside the MoE-LoRA config (fl/inprocess.py), read back by eval and export
META_TYPES = {"model": str, "task": str, "task_type": str, "max_seq_len": int,
              "max_new_tokens": int}  # fmt: skip


def _inside(module_name: str, targets: list[str]) -> bool:
    """Whether ``module_name`` or one of its ancestors matches a target."""
    parts = module_name.split(".")
    return any(_matches(".".join(parts[:i]), targets) for i in range(1, len(parts) + 1))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter, router and trainable-head tensors of ``model`` by parameter name (detached)."""
    config = getattr(model, "moe_lora_config", None)
    heads = config.trainable_modules if config is not None else []
    layers = moe_lora_layers(model)
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        in_layer = owner in layers and leaf in ("lora_A", "lora_B", "router")
        if in_layer or _inside(owner, heads):
            out[name] = param.detach()
    return out


def check_state_dict(
    expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Raise ``ValueError`` naming every missing, unexpected, mis-shaped or mis-typed tensor
    (``expected`` is what the code holds: a mismatch in its own state is not bad input)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for k in sorted(set(expected) & set(given)):
        e, g = expected[k], given[k]
        if tuple(e.shape) != tuple(g.shape):
            problems.append(f"{k}: shape {tuple(g.shape)}, expected {tuple(e.shape)}")
        elif e.dtype != g.dtype:
            problems.append(f"{k}: dtype {g.dtype}, expected {e.dtype}")
    if problems:
        raise ValueError(f"{source} does not fit the model: " + "; ".join(problems))


def load_adapter_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Copy ``state`` into the model's adapter tensors; refuse any key or shape mismatch."""
    own = adapter_state_dict(model)
    check_state_dict(own, state, source)
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k])


def save_adapter(model: nn.Module, directory: str | Path, extra: dict | None = None) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``directory``.

    ``extra``: more JSON for the config file (e.g. the base model's name and the task), read
    back by :func:`read_adapter_meta`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(state, str(directory / WEIGHTS_NAME))
    config = getattr(model, "moe_lora_config", None)
    meta = {"moe_lora": config.to_dict() if config is not None else None, **(extra or {})}
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_adapter_meta(directory: str | Path) -> dict:
    """Everything in ``adapter_config.json``; ``AdapterError`` naming the file if unreadable."""
    path = Path(directory) / CONFIG_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"cannot read adapter config {path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise AdapterError(f"adapter config {path} must hold a JSON object")
    for key, kind in META_TYPES.items():
        value = meta.get(key)
        if value is None:
            continue
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise AdapterError(f"adapter config {path}: {key!r} must be an integer >= 1, "
                               f"got {value!r}")  # fmt: skip
        if kind is str and not isinstance(value, str):
            raise AdapterError(f"adapter config {path}: {key!r} must be a string, got {value!r}")
    return meta


def read_adapter_config(directory: str | Path) -> MoELoRAConfig:
    """The ``MoELoRAConfig`` saved beside an adapter."""
    meta = read_adapter_meta(directory)
    try:
        config = MoELoRAConfig(**meta["moe_lora"])
        config.validate()
    except (KeyError, TypeError, ValueError) as exc:
        path = Path(directory) / CONFIG_NAME
        raise AdapterError(f"adapter config {path}: bad 'moe_lora' entry ({exc})") from exc
    return config


def inject_saved(model: nn.Module, config: MoELoRAConfig, directory: str | Path,
                 backend: str = "auto") -> None:  # fmt: skip
    """Inject the MoE-LoRA layers of the adapter saved in ``directory`` (its ``config``, from
    :func:`read_adapter_config`) into ``model`` and load its weights; ``AdapterError`` when the
    saved config names modules the model lacks or the weights do not fit."""
    try:
        inject_moe_lora(model, config, backend=backend)
    except ValueError as exc:
        raise AdapterError(f"adapter {directory}: {exc}") from exc
    load_adapter(model, directory)


def load_adapter(model: nn.Module, directory: str | Path) -> None:
    """Load weights written by :func:`save_adapter` into ``model`` (strict: names, shapes,
    dtypes; tensors holding NaN or Inf are refused, by name)."""
    path = Path(directory) / WEIGHTS_NAME
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise AdapterError(f"cannot read adapter weights {path}: {exc}") from exc
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(f"adapter weights {path} hold NaN or Inf in {sorted(bad)[:3]}")
    device = next(iter(adapter_state_dict(model).values())).device
    try:
        load_adapter_state_dict(model, {k: v.to(device) for k, v in state.items()}, str(path))
    except ValueError as exc:  # the file's tensors do not fit: the file is at fault
        raise AdapterError(str(exc)) from exc


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from a safetensors file's header (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as exc:
        raise AdapterError(f"cannot read adapter weights {path}: {exc}") from exc


def saved_head_labels(directory: str | Path, config: MoELoRAConfig, meta: dict) -> int | None:
    """Check the saved tensors' headers against the adapter's config before a model is built
    for it (a config claiming rank 10**9 must not allocate first): every ``lora_A`` is
    ``(num_experts, rank, in)``, every ``lora_B`` ``(num_experts, out, rank)``, there is at least
    one, and the classifier head's rows equal the config's ``num_labels``. Returns that label
    count (None: no classifier head). ``AdapterError`` naming the file and tensor."""
    path = Path(directory) / WEIGHTS_NAME
    shapes = _tensor_shapes(path)
    m, r = config.num_experts, config.rank
    lora = {k: v for k, v in shapes.items() if k.endswith((".lora_A", ".lora_B"))}
    if not lora:
        raise AdapterError(f"adapter weights {path} hold no lora_A/lora_B tensors")
    for name, shape in sorted(lora.items()):
        a = name.endswith(".lora_A")
        if len(shape) != 3 or shape[0] != m or shape[1 if a else 2] != r:
            want = f"({m}, {r}, in)" if a else f"({m}, out, {r})"
            raise AdapterError(
                f"adapter weights {path}: {name} has shape {shape}, its config says "
                f"{want} (num_experts {m}, rank {r})"
            )
    heads = [k for k in shapes if k.endswith(("classifier.out_proj.weight", "classifier.weight"))]
    if not heads:
        return None
    rows = shapes[sorted(heads, key=len)[-1]][0]
    said = meta.get("num_labels", rows)
    if isinstance(said, bool) or not isinstance(said, int) or said != rows:
        raise AdapterError(
            f"adapter config {Path(directory) / CONFIG_NAME}: num_labels = "
            f"{said!r}, but its head has {rows} rows"
        )
    return rows
