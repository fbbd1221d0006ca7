"""The run configuration: YAML in, a validated typed ``FLConfig`` out."""

from __future__ import annotations

import dataclasses
import math
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..data.glue import TASKS
from ..precision import PRECISIONS
from .faults import ATTACK_KEYS, ATTACK_KINDS, FAULT_KEYS
from .robust import Aggregation, AggregationError
from .types import OPTIMIZERS

METHODS = (
    "fedlease",
    "fedlease_topk",
    "fedlease_fixed_k",
    "fedlease_random",
    "local",
    "fedit",
    "ffa_lora",
    "fedsa_lora",
    "feddpa",
    "ifca",
)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the value."""


@dataclass
class FLConfig:
    """Every setting of a federated run. Defaults follow the FedLEASE paper."""

    clients: list[str]  # one task per client, e.g. [sst2, sst2, qnli, qnli] (or {task: count})
    task_type: str = "classification"  # GLUE classification, or "generation" (FLAN, causal LM)
    model: str = "minilm"  # "minilm" / "smollm2" (bundled) or a Hugging Face name / local path
    method: str = "fedlease"  # or a baseline / ablation: see fedlease.fl.strategies
    train_samples: int = 1000  # training examples per client
    test_samples: int = 200  # held-out examples per client
    label_alpha: float | None = None  # Dirichlet label skew within a task; None = uniform
    warmup_rounds: int = 5
    warmup_aggregate: bool = False  # FedAvg the warm-up LoRA (the paper trains it locally)
    warmup_optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adamw": FedLEASE's warm-up rounds
    warmup_lr: float = 0.005  # learning rate of the warm-up rounds
    warmup_class_balanced: bool = True  # warm-up loss weighs classes by inverse frequency
    warmup_dropout: bool = False  # dropout during the warm-up rounds
    warmup_average_b: bool = False  # warm-up B = its mean over the round's steps (Polyak)
    rounds: int = 20  # adaptive rounds after the warm-up
    clients_per_round: int | float | None = None  # clients drawn per round (a count or a fraction)
    eval_every: int = 1  # evaluate every client every this many rounds (and after the last)
    local_epochs: int = 2
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    max_seq_len: int = 128
    max_new_tokens: int = 32  # generation: greedy decoding budget per held-out example
    rank: int = 4
    alpha: float = 16.0
    dropout: float = 0.05
    fast_dropout: bool = True  # counter-based dropout on CPU (fedlease.dropout); false: aten's
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    max_experts: int = 4
    num_experts: int | str = "auto"  # "auto" (silhouette over 2..max_experts) or a fixed K
    top_k: int = 2  # experts per token in the fedlease_topk ablation (capped at K)
    seed: int = 0
    data_dir: str | None = None  # local <dir>/<task>/{train,validation}.jsonl; else the hub
    backend: str = "auto"
    device: str = "auto"  # auto (a GPU when there is one), cpu, cuda, cuda:N
    precision: str = "auto"  # auto (bf16 where the hardware is fast in it), fp32, bf16
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    faults: dict | None = None  # fault injection for tests: see fedlease.fl.faults
    aggregation: str | dict = "mean"  # mean, median, trimmed_mean, norm_clip, krum: fl.robust
    max_norm_ratio: float | None = None  # reject uploads over this x the median norm of their group
    attacks: dict | None = None  # tampered uploads for robustness studies: fedlease.fl.faults

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# One line per key for `fedlease run --help` (a test checks that every key has one).
KEY_HELP = {
    "clients": "one task per client (GLUE, or FLAN for generation), e.g. [sst2, sst2, qnli, "
    "qnli], or a count per task, e.g. {sst2: 250, qnli: 250} (required)",
    "task_type": "classification (GLUE, accuracy) or generation (FLAN instruction tasks on a "
    "causal LM, ROUGE; model then defaults to smollm2 and target_modules to [q_proj, v_proj])",
    "model": "'minilm' / 'smollm2' (bundled) or a Hugging Face name or local path; null: the "
    "task type's default (minilm, smollm2 for generation)",
    "method": f"fedlease or an ablation / baseline: {', '.join(METHODS[1:])}",
    "train_samples": "training examples per client",
    "test_samples": "held-out examples per client (GLUE: validation split; FLAN: test split)",
    "label_alpha": "Dirichlet label skew within a task; null: each client's labels as the task's",
    "warmup_rounds": "rounds in which every client trains one plain LoRA (FedLEASE needs >= 1)",
    "warmup_aggregate": "FedAvg the warm-up LoRA (the paper trains it locally: false)",
    "warmup_optimizer": "optimizer of the warm-up rounds: sgd (momentum 0.9) or adamw",
    "warmup_lr": "learning rate of the warm-up rounds",
    "warmup_class_balanced": "warm-up loss weighs each class by its inverse frequency",
    "warmup_dropout": "dropout during the warm-up rounds",
    "warmup_average_b": "a warm-up round leaves B as its mean over the round's steps (what the "
    "allocation clusters and the experts start from), not its last value",
    "rounds": "adaptive rounds after the warm-up (or rounds of a baseline)",
    "clients_per_round": "clients that train in a round, drawn from the run seed: a count, a "
    "fraction of all clients, or null for all (FedLEASE's warm-up rounds train every client)",
    "eval_every": "evaluate every client every this many rounds, and after the last",
    "local_epochs": "passes over its data a client makes per round",
    "batch_size": "training batch size",
    "eval_batch_size": "evaluation batch size",
    "lr": "learning rate (AdamW) of the rounds after the warm-up",
    "weight_decay": "AdamW weight decay",
    "max_seq_len": "tokens per example after truncation",
    "max_new_tokens": "generation: tokens a client may generate per held-out prompt (greedy)",
    "rank": "LoRA rank r of every expert",
    "alpha": "LoRA alpha (the update is scaled by alpha / rank)",
    "dropout": "dropout on the experts' input",
    "fast_dropout": "on the CPU, every dropout of the model and the experts from a counter-based "
    "generator (vectorised, parallel; the mask a function of a seed from torch's generator); "
    "false: aten's dropout, as PyTorch models have it",
    "target_modules": "linear layers that get MoE-LoRA, matched by name suffix; null: the task "
    "type's default ([query, value], [q_proj, v_proj] for generation)",
    "max_experts": "largest K the silhouette search tries (num_experts: auto)",
    "num_experts": "'auto' (silhouette over K = 2..max_experts) or a fixed number of experts",
    "top_k": "experts per token in the fedlease_topk ablation (capped at K)",
    "seed": "draws the partitions and every client's randomness",
    "data_dir": "local GLUE copy <dir>/<task>/{train,validation}.jsonl (null: $FEDLEASE_DATA_DIR, "
    "else the hub); generation: FLAN <dir>/<task>/{train,test}.jsonl (null: $FEDLEASE_FLAN_DIR)",
    "backend": "MoE-LoRA op backend: auto, torch, triton, cpp",
    "device": "auto (a GPU when there is one), cpu, cuda or cuda:N",
    "precision": "auto (bf16 where the hardware is fast in it), fp32 or bf16 (frozen base in "
    "bf16, adapters float32, autocast)",
    "threads": "torch intra-op threads; null leaves torch's default",
    "faults": "fault injection for tests, e.g. {client_failure_rate: 0.2, nan_update_rate: 0.1, "
    "seed: 0}",
    "aggregation": "how the server combines the uploads of one aggregate: mean (sample-weighted), "
    "median, trimmed_mean, norm_clip or krum (Multi-Krum), or e.g. {rule: trimmed_mean, "
    "trim: 0.25} or {rule: krum, byzantine: 1}",
    "max_norm_ratio": "reject an upload whose norm exceeds this many times the median norm of the "
    "uploads it aggregates with (null: no bound)",
    "attacks": "tampered uploads for robustness studies, e.g. {clients: [3], kind: scale, factor: "
    "100}; kinds: scale, sign_flip, noise, wrong_shape, wrong_dtype",
}


def keys_help() -> str:
    """The config keys with their defaults and meaning, for ``--help``."""
    defaults = FLConfig(clients=[]).to_dict()
    lines = ["config keys (in the YAML file or with --set KEY=VALUE; default in brackets):"]
    for key, text in KEY_HELP.items():
        shown = yaml.safe_dump(defaults[key], default_flow_style=True).strip().removesuffix("...")
        default = "" if key == "clients" else f" [{shown.strip()}]"
        lines += textwrap.wrap(f"{key}{default}: {text}", 96, initial_indent="  ",
                               subsequent_indent="      ")  # fmt: skip
    return "\n".join(lines)


_POSITIVE_INT = (
    "train_samples",
    "test_samples",
    "local_epochs",
    "batch_size",
    "eval_batch_size",
    "max_seq_len",
    "max_new_tokens",
    "rank",
    "max_experts",
    "top_k",
)
_NON_NEGATIVE_INT = ("warmup_rounds", "rounds", "seed")


_UNIONS = (typing.Union, getattr(__import__("types"), "UnionType", None))  # X | Y and Optional[X]


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in _UNIONS:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if hint is float:  # finite numbers only: nan and inf pass every "> 0" check unnoticed
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


# YAML 1.1 (PyYAML) reads 3e-3 as a string: it wants a dot (3.0e-3). Such a string, given for a
# key that takes a number, is read as the number the user wrote.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _takes_float(hint) -> bool:
    if hint is float:
        return True
    return typing.get_origin(hint) in _UNIONS and float in typing.get_args(hint)


def _number_if_exponent(value, hint):
    if isinstance(value, str) and _takes_float(hint) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def _type_name(hint) -> str:
    if hint is float:
        return "a finite number"
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def from_dict(raw: dict) -> FLConfig:
    """Validate ``raw`` (parsed YAML) into an ``FLConfig``; raise ``ConfigError`` on any problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(raw).__name__}")
    hints = typing.get_type_hints(FLConfig)
    raw = {k: _number_if_exponent(v, hints[k]) if k in hints else v for k, v in raw.items()}
    # null model / target_modules: the task type's default (a Flower app config must list them)
    raw = {k: v for k, v in raw.items() if not (k in GENERATION_DEFAULTS and v is None)}
    for key, value in raw.items():
        if key == "clients" and isinstance(value, dict):
            continue  # the compact form, expanded below
        if key not in hints:
            raise ConfigError(f"unknown config key {key!r} (known: {', '.join(hints)})")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"config key {key!r} must be {_type_name(hints[key])}, got {value!r}")
    if "clients" not in raw:
        raise ConfigError("config key 'clients' is required (a list of task names, one per client)")
    if isinstance(raw["clients"], dict):
        raw = {**raw, "clients": expand_clients(raw["clients"])}
    if raw.get("task_type") == "generation":  # a causal LM's defaults
        raw = {**GENERATION_DEFAULTS, **raw}
    cfg = FLConfig(**{k: (float(v) if hints[k] is float else v) for k, v in raw.items()})
    validate(cfg, explicit=set(raw))
    return cfg


TASK_TYPES = ("classification", "generation")
GENERATION_DEFAULTS = {"model": "smollm2", "target_modules": ["q_proj", "v_proj"]}
METRIC = {"classification": "accuracy", "generation": "rouge1"}  # what runs are ranked by
LABEL = {"accuracy": "accuracy", "rouge1": "ROUGE-1"}  # a metric's name in tables and plots


def metric_of(cfg: FLConfig) -> str:
    """The per-client score a run reports and means: accuracy, or ROUGE-1 for generation."""
    return METRIC[cfg.task_type]


def expand_clients(counts: dict) -> list[str]:
    """``{task: count, ...}`` -> one task name per client, the tasks in the order given."""
    for task, count in counts.items():
        if not isinstance(task, str) or isinstance(count, bool) or not isinstance(count, int):
            raise ConfigError(f"config key 'clients': {task!r}: {count!r} must be a task name "
                              "and a whole number of clients")  # fmt: skip
        if count < 1:
            raise ConfigError(f"config key 'clients': {task}: {count} must be >= 1")
    return [task for task, count in counts.items() for _ in range(count)]


def clients_per_round(cfg: FLConfig) -> int:
    """How many clients train in a sampled round (``clients_per_round`` resolved against the
    number of clients; a fraction rounds to the nearest count, at least 1)."""
    n, value = len(cfg.clients), cfg.clients_per_round
    if value is None:
        return n
    if isinstance(value, int):
        return value
    return max(1, min(n, round(value * n)))


def validate(cfg: FLConfig, explicit: set[str] | None = None) -> None:
    """Check ranges and consistency. ``explicit``: keys the user set (defaults are forgiven
    where they merely exceed what a small run can use, like ``max_experts``)."""
    explicit = set(cfg.to_dict()) if explicit is None else explicit

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"config key {key!r} = {getattr(cfg, key)!r}: {why}")

    if len(cfg.clients) < 2:
        raise bad("clients", "need at least 2 clients")
    if cfg.task_type not in TASK_TYPES:
        raise bad("task_type", f"must be one of {', '.join(TASK_TYPES)}")
    for task in cfg.clients if cfg.task_type == "classification" else ():  # FLAN: checked on load
        if task not in TASKS:
            raise ConfigError(
                f"config key 'clients': unknown task {task!r} (known: {', '.join(TASKS)})"
            )
    if cfg.method not in METHODS:
        raise bad("method", f"must be one of {METHODS}")
    for key in _POSITIVE_INT:
        if getattr(cfg, key) < 1:
            raise bad(key, "must be >= 1")
    for key in _NON_NEGATIVE_INT:
        if getattr(cfg, key) < 0:
            raise bad(key, "must be >= 0")
    for key in ("lr", "warmup_lr"):
        if getattr(cfg, key) <= 0:
            raise bad(key, "must be > 0")
    if cfg.warmup_optimizer not in OPTIMIZERS:
        raise bad("warmup_optimizer", f"must be one of {OPTIMIZERS}")
    if cfg.weight_decay < 0:
        raise bad("weight_decay", "must be >= 0")
    if cfg.alpha <= 0:
        raise bad("alpha", "must be > 0")
    if not 0 <= cfg.dropout < 1:
        raise bad("dropout", "must be in [0, 1)")
    if cfg.label_alpha is not None and cfg.label_alpha <= 0:
        raise bad("label_alpha", "must be > 0 (or null for no label skew)")
    if not cfg.target_modules:
        raise bad("target_modules", "must name at least one module")
    n = len(cfg.clients)
    if "max_experts" in explicit and cfg.max_experts > n:
        raise bad("max_experts", f"more experts than clients ({n})")
    if isinstance(cfg.num_experts, str):
        if cfg.num_experts != "auto":
            raise bad("num_experts", "must be 'auto' or an integer")
        if cfg.max_experts < 2:
            raise bad("max_experts", "must be >= 2 when num_experts is 'auto'")
        if n < 3:
            raise bad(
                "clients", "silhouette-based selection (num_experts: auto) needs >= 3 clients"
            )
    elif not 1 <= cfg.num_experts <= n:
        raise bad("num_experts", f"must be in 1..{n} (one expert per cluster of clients)")
    if cfg.method.startswith("fedlease") and cfg.rounds > 0 and cfg.warmup_rounds == 0:
        raise bad("warmup_rounds", f"method {cfg.method!r} clusters the clients by their "
                  "warm-up LoRA B matrices: it needs warmup_rounds >= 1")  # fmt: skip
    if cfg.backend not in ("auto", "torch", "triton", "cpp"):
        raise bad("backend", "must be one of auto, torch, triton, cpp")
    if cfg.device != "auto" and re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device) is None:
        raise bad("device", "must be auto, cpu, cuda or cuda:N")
    if cfg.precision not in PRECISIONS:
        raise bad("precision", f"must be one of {', '.join(PRECISIONS)}")
    k = cfg.clients_per_round
    if isinstance(k, int) and not 1 <= k <= n:
        raise bad("clients_per_round", f"a count must be in 1..{n} (the number of clients)")
    if isinstance(k, float) and not 0 < k <= 1:
        raise bad("clients_per_round", "a fraction must be in (0, 1]")
    if cfg.eval_every < 1:
        raise bad("eval_every", "must be >= 1")
    if cfg.threads is not None and cfg.threads < 1:
        raise bad("threads", "must be >= 1")
    for key, value in (cfg.faults or {}).items():
        if key not in FAULT_KEYS:
            raise ConfigError(f"unknown config key 'faults.{key}' (known: {', '.join(FAULT_KEYS)})")
        if not _type_ok(value, FAULT_KEYS[key]):
            raise ConfigError(f"config key 'faults.{key}' must be {FAULT_KEYS[key].__name__}, "
                              f"got {value!r}")  # fmt: skip
        if key.endswith("_rate") and not 0 <= value < 1:
            raise ConfigError(f"config key 'faults.{key}' = {value!r}: must be in [0, 1)")
    try:
        Aggregation.from_config(cfg.aggregation)
    except AggregationError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.max_norm_ratio is not None and not cfg.max_norm_ratio > 1:
        raise bad("max_norm_ratio", "must be > 1 (or null)")
    _validate_attacks(cfg.attacks, len(cfg.clients))


def _validate_attacks(attacks: dict | None, n: int) -> None:
    for key, value in (attacks or {}).items():
        if key not in ATTACK_KEYS:
            raise ConfigError(f"unknown config key 'attacks.{key}' (known: "
                              f"{', '.join(ATTACK_KEYS)})")  # fmt: skip
        if not _type_ok(value, ATTACK_KEYS[key]):
            raise ConfigError(f"config key 'attacks.{key}' must be {ATTACK_KEYS[key].__name__}, "
                              f"got {value!r}")  # fmt: skip
    attacks = attacks or {}
    if attacks.get("kind", "scale") not in ATTACK_KINDS:
        raise ConfigError(f"config key 'attacks.kind' = {attacks['kind']!r}: choose from "
                          f"{', '.join(ATTACK_KINDS)}")  # fmt: skip
    for c in attacks.get("clients", []):
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < n:
            raise ConfigError(
                f"config key 'attacks.clients' holds {c!r}: client ids are 0..{n - 1}"
            )


def runtime(cfg: FLConfig) -> tuple[torch.device, str]:
    """The device and precision this machine runs ``cfg`` with; ``ConfigError`` naming the key
    when the device is not here (``cuda`` without a GPU)."""
    from ..precision import resolve_device, resolve_precision

    try:
        device = resolve_device(cfg.device)
    except ValueError as exc:
        raise ConfigError(f"config key 'device': {exc}") from None
    return device, resolve_precision(cfg.precision, device)


def parse_override(item: str) -> tuple[str, object]:
    """``key=value`` with a YAML value, e.g. ``rounds=3`` or ``clients=[sst2,qnli]``."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, _, text = item.partition("=")
    try:
        return key.strip(), yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from exc


def load_config(path: str | Path, overrides: list[str] = ()) -> FLConfig:
    """Read a YAML config file, apply ``key=value`` overrides, validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    for item in overrides:
        key, value = parse_override(item)
        raw[key] = value
    return from_dict(raw)
