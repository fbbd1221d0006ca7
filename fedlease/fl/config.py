"""The run configuration: YAML in, a validated typed ``FLConfig`` out."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

from ..data.glue import TASKS
from ..ops.dispatch import BACKEND_NAMES
from ..precision import MAX_THREADS, PRECISIONS
from .faults import ATTACK_KEYS, ATTACK_KINDS, FAULT_KEYS
from .robust import Aggregation, AggregationError
from .strategies import STRATEGIES
from .types import OPTIMIZERS


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the value."""


# A key's check: its value -> why it is refused, or None. Each key is declared once below: type,
# default, check and help; validation, `fedlease run --help` and the Flower app config (a test
# checks it lists every key) come from these declarations.
Check = Callable[[object], "str | None"]


def at_least(low: int) -> Check:
    return lambda v: None if v >= low else f"must be >= {low}"


def between(low: int, high: int) -> Check:
    return lambda v: None if low <= v <= high else f"must be in {low}..{high:,}"


def above(low: float, why: str = "") -> Check:
    return lambda v: None if v > low else why or f"must be > {low:g}"


def one_of(choices: Callable[[], tuple[str, ...]]) -> Check:
    return lambda v: None if v in choices() else f"must be one of {', '.join(choices())}"


def optional(check: Check) -> Check:
    """``check``, with null allowed."""
    return lambda v: None if v is None else check(v)


def setting(default, help: str, check: Check | None = None):
    """A config key: its default (a list default is copied per config), check and help."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "check": check})
    return field(default=default, metadata={"help": help, "check": check})


METHODS = tuple(STRATEGIES)  # every method's name, from the strategy registry
BACKENDS = ("auto", *BACKEND_NAMES)
TASK_TYPES = ("classification", "generation")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class FLConfig:
    """Every setting of a federated run. Defaults follow the FedLEASE paper."""

    clients: list[str] = field(metadata={"help": "one task per client (GLUE, or FLAN for "
        "generation), e.g. [sst2, sst2, qnli, qnli], or a count per task, e.g. {sst2: 250, qnli: "
        "250} (required)", "check": None})  # fmt: skip
    task_type: str = setting("classification", "classification (GLUE, accuracy) or generation "
        "(FLAN instruction tasks on a causal LM, ROUGE; model then defaults to smollm2 and "
        "target_modules to [q_proj, v_proj])", one_of(lambda: TASK_TYPES))  # fmt: skip
    model: str = setting("minilm", "'minilm' / 'smollm2' (bundled) or a Hugging Face name or local "
        "path; null: the task type's default (minilm, smollm2 for generation)")  # fmt: skip
    method: str = setting("fedlease", "fedlease or an ablation / baseline: "
        + ", ".join(METHODS[1:]), one_of(lambda: METHODS))  # fmt: skip
    train_samples: int = setting(1000, "training examples per client", at_least(1))
    test_samples: int = setting(200, "held-out examples per client (GLUE: validation split; FLAN: "
        "test split)", at_least(1))  # fmt: skip
    label_alpha: float | None = setting(None, "Dirichlet label skew within a task; null: each "
        "client's labels as the task's", optional(above(0, "must be > 0 (or null for no label "
        "skew)")))  # fmt: skip
    warmup_rounds: int = setting(5, "rounds in which every client trains one plain LoRA (FedLEASE "
        "needs >= 1)", at_least(0))  # fmt: skip
    warmup_aggregate: bool = setting(False, "FedAvg the warm-up LoRA (the paper trains it locally: "
        "false)")  # fmt: skip
    warmup_optimizer: str = setting("sgd", "optimizer of the warm-up rounds: sgd (momentum 0.9) or "
        "adamw", one_of(lambda: OPTIMIZERS))  # fmt: skip
    warmup_lr: float = setting(0.005, "learning rate of the warm-up rounds", above(0))
    warmup_class_balanced: bool = setting(True, "warm-up loss weighs each class by its inverse "
        "frequency")  # fmt: skip
    warmup_dropout: bool = setting(False, "dropout during the warm-up rounds")
    warmup_average_b: bool = setting(False, "a warm-up round leaves B as its mean over the "
        "round's steps (what the allocation clusters and the experts start from), not its last "
        "value")  # fmt: skip
    rounds: int = setting(20, "adaptive rounds after the warm-up (or rounds of a baseline)",
        at_least(0))  # fmt: skip
    clients_per_round: int | float | None = setting(None, "clients that train in a round, drawn "
        "from the run seed: a count, a fraction of all clients, or null for all (FedLEASE's "
        "warm-up rounds train every client)")  # fmt: skip
    client_batch: int | str = setting(1, "clients trained (and evaluated) at once in this "
        "process, in lockstep through one frozen model: one forward and backward per step over "
        "their batches, each client still on its own data, adapters, head and optimizer; 1: one "
        "after another; 'auto': every participant on a GPU (halved while the GPU runs out of "
        "memory); on the CPU up to 16 classification clients in training (fewer where half the "
        "machine's memory would not hold their steps), generation clients and every evaluation "
        "one by one",
        lambda v: None if v == "auto" or (isinstance(v, int) and v >= 1)
        else "must be 'auto' or an integer >= 1")  # fmt: skip
    eval_every: int = setting(1, "evaluate every client every this many rounds, and after the last",
        at_least(1))  # fmt: skip
    local_epochs: int = setting(2, "passes over its data a client makes per round", at_least(1))
    batch_size: int = setting(16, "training batch size", at_least(1))
    eval_batch_size: int = setting(64, "evaluation batch size", at_least(1))
    lr: float = setting(3e-3, "learning rate (AdamW) of the rounds after the warm-up", above(0))
    weight_decay: float = setting(0.05, "AdamW weight decay", at_least(0))
    max_seq_len: int = setting(128, "tokens per example after truncation", at_least(1))
    max_new_tokens: int = setting(32, "generation: tokens a client may generate per held-out "
        "prompt (greedy)", at_least(1))  # fmt: skip
    rank: int = setting(4, "LoRA rank r of every expert", at_least(1))
    alpha: float = setting(16.0, "LoRA alpha (the update is scaled by alpha / rank)", above(0))
    dropout: float = setting(0.05, "dropout on the experts' input",
        lambda v: None if 0 <= v < 1 else "must be in [0, 1)")  # fmt: skip
    fast_dropout: bool = setting(True, "on the CPU, every dropout of the model and the experts "
        "from a counter-based generator (vectorised, parallel; the mask a function of a seed from "
        "torch's generator); false: aten's dropout, as PyTorch models have it")  # fmt: skip
    pack_sequences: bool = setting(True, "on the CPU, classification on a BERT-family encoder "
        "(MiniLM): the linear layers see only a batch's real tokens, not its padding (the "
        "attention pads each client's rows to their longest); false, or any other model: every "
        "layer computes the padding too")  # fmt: skip
    first_token_only: bool = setting(True, "classification on a BERT-family sequence "
        "classifier (MiniLM): the last layer computes only the first token, the one the "
        "classifier reads (logits and gradients unchanged up to rounding); false: every "
        "token")  # fmt: skip
    target_modules: list[str] = setting(["query", "value"], "linear layers that get MoE-LoRA, "
        "matched by name suffix; null: the task type's default ([query, value], [q_proj, v_proj] "
        "for generation)", lambda v: None if v else "must name at least one module")  # fmt: skip
    max_experts: int = setting(4, "largest K the silhouette search tries (num_experts: auto)",
        at_least(1))  # fmt: skip
    num_experts: int | str = setting("auto", "'auto' (silhouette over K = 2..max_experts) or a "
        "fixed number of experts")  # fmt: skip
    top_k: int = setting(2, "experts per token in the fedlease_topk ablation (capped at K)",
        at_least(1))  # fmt: skip
    seed: int = setting(0, "draws the partitions and every client's randomness",
        lambda v: None if 0 <= v < 2**63 else "must be in 0..2**63-1")  # fmt: skip
    data_dir: str | None = setting(None, "local GLUE copy <dir>/<task>/{train,validation}.jsonl "
        "(null: $FEDLEASE_DATA_DIR, else the hub); generation: FLAN <dir>/<task>/{train,test}"
        ".jsonl (null: $FEDLEASE_FLAN_DIR)")  # fmt: skip
    backend: str = setting("auto", "MoE-LoRA op backend: " + ", ".join(BACKENDS),
        one_of(lambda: BACKENDS))  # fmt: skip
    device: str = setting("auto", "auto (a GPU when there is one), cpu, cuda or cuda:N",
        lambda v: None if DEVICE.fullmatch(v) else "must be auto, cpu, cuda or cuda:N")  # fmt: skip
    precision: str = setting("auto", "auto (bf16 where the hardware is fast in it), fp32 or "
        "bf16 (frozen base in bf16, adapters float32, autocast)",
        one_of(lambda: PRECISIONS))  # fmt: skip
    threads: int | None = setting(None, f"torch intra-op threads (1..{MAX_THREADS:,}); "
        "null leaves torch's default", optional(between(1, MAX_THREADS)))  # fmt: skip
    faults: dict | None = setting(None, "fault injection for tests, e.g. {client_failure_rate: "
        "0.2, nan_update_rate: 0.1, seed: 0}")  # fmt: skip
    aggregation: str | dict = setting("mean", "how the server combines the uploads of one "
        "aggregate: mean (sample-weighted), median, trimmed_mean, norm_clip or krum "
        "(Multi-Krum), or e.g. {rule: trimmed_mean, trim: 0.25} or {rule: krum, byzantine: "
        "1}")  # fmt: skip
    max_norm_ratio: float | None = setting(None, "reject an upload whose norm exceeds this many "
        "times the median norm of the uploads it aggregates with (null: no bound)",
        optional(above(1, "must be > 1 (or null)")))  # fmt: skip
    attacks: dict | None = setting(None, "tampered uploads for robustness studies, e.g. "
        "{clients: [3], kind: scale, factor: 100}; kinds: scale, sign_flip, noise, wrong_shape, "
        "wrong_dtype")  # fmt: skip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# One line per key for `fedlease run --help`, from the declarations.
KEY_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(FLConfig)}


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
            raise ConfigError(f"unknown config key {shown(key)} (known: {', '.join(hints)})")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"config key {key!r} must be {_type_name(hints[key])}, got "
                              f"{shown(value)}")  # fmt: skip
    if "clients" not in raw:
        raise ConfigError("config key 'clients' is required (a list of task names, one per client)")
    if isinstance(raw["clients"], dict):
        raw = {**raw, "clients": expand_clients(raw["clients"])}
    if raw.get("task_type") == "generation":  # a causal LM's defaults
        raw = {**GENERATION_DEFAULTS, **raw}
    cfg = FLConfig(**{k: (float(v) if hints[k] is float else v) for k, v in raw.items()})
    validate(cfg, explicit=set(raw))
    return cfg


GENERATION_DEFAULTS = {"model": "smollm2", "target_modules": ["q_proj", "v_proj"]}
METRIC = {"classification": "accuracy", "generation": "rouge1"}  # what runs are ranked by
LABEL = {"accuracy": "accuracy", "rouge1": "ROUGE-1"}  # a metric's name in tables and plots


def metric_of(cfg: FLConfig) -> str:
    """The per-client score a run reports and means: accuracy, or ROUGE-1 for generation."""
    return METRIC[cfg.task_type]


MAX_CLIENTS = 1_000_000  # a bound on the list itself; memory is checked with the model loaded


def expand_clients(counts: dict) -> list[str]:
    """``{task: count, ...}`` -> one task name per client, the tasks in the order given."""
    for task, count in counts.items():
        if not isinstance(task, str) or isinstance(count, bool) or not isinstance(count, int):
            raise ConfigError(f"config key 'clients': {task!r}: {count!r} must be a task name "
                              "and a whole number of clients")  # fmt: skip
        if count < 1:
            raise ConfigError(f"config key 'clients': {task}: {count} must be >= 1")
    if (total := sum(counts.values())) > MAX_CLIENTS:
        raise ConfigError(f"config key 'clients': {total} clients, more than {MAX_CLIENTS:,}")
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
    """Check every key's own range (its declaration's check), then the keys against each other.
    ``explicit``: keys the user set (defaults are forgiven where they merely exceed what a small
    run can use, like ``max_experts``)."""
    for f in dataclasses.fields(FLConfig):
        check = f.metadata.get("check")
        why = check(getattr(cfg, f.name)) if check else None
        if why:
            raise ConfigError(f"config key {f.name!r} = {shown(getattr(cfg, f.name))}: {why}")
    _validate_clients(cfg, set(cfg.to_dict()) if explicit is None else explicit)
    _validate_nested(cfg)


def _validate_clients(cfg: FLConfig, explicit: set[str]) -> None:
    """The clients, and what depends on how many there are."""

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"config key {key!r} = {shown(getattr(cfg, key))}: {why}")

    n = len(cfg.clients)
    if not 2 <= n <= MAX_CLIENTS:
        raise ConfigError(f"config key 'clients': {n} clients, need 2..{MAX_CLIENTS:,}")
    for task in cfg.clients if cfg.task_type == "classification" else ():  # FLAN: checked on load
        if task not in TASKS:
            raise ConfigError(
                f"config key 'clients': unknown task {task!r} (known: {', '.join(TASKS)})"
            )
    if "max_experts" in explicit and cfg.max_experts > n:
        raise bad("max_experts", f"more experts than clients ({n})")
    if cfg.method == "fedlease_fixed_k" and cfg.max_experts > n:
        raise bad("max_experts", f"method 'fedlease_fixed_k' makes max_experts experts, more "
                  f"than the clients ({n})")  # fmt: skip
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
    k = cfg.clients_per_round
    if isinstance(k, int) and not 1 <= k <= n:
        raise bad("clients_per_round", f"a count must be in 1..{n} (the number of clients)")
    if isinstance(k, float) and not 0 < k <= 1:
        raise bad("clients_per_round", "a fraction must be in (0, 1]")
    _validate_attacks(cfg.attacks, n)


def _validate_nested(cfg: FLConfig) -> None:
    """The keys that hold a mapping of their own: faults and aggregation."""
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


class Runtime(NamedTuple):
    """Where and in what precision a run's clients compute: resolved once per process."""

    device: torch.device
    precision: str  # "fp32" or "bf16"


def runtime(cfg: FLConfig) -> Runtime:
    """The device and precision this machine runs ``cfg`` with; ``ConfigError`` naming the key
    when the device is not here (``cuda`` without a GPU), or when the op backend (the config's,
    or ``$FEDLEASE_BACKEND``'s) cannot run on it (``triton`` on a CPU)."""
    from ..ops.dispatch import ENV_VAR, resolve_backend
    from ..precision import resolve_device, resolve_precision

    try:
        device = resolve_device(cfg.device)
    except ValueError as exc:
        raise ConfigError(f"config key 'device': {exc}") from None
    try:
        resolve_backend(cfg.backend, device)
    except (ValueError, RuntimeError) as exc:
        source = f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "config key 'backend'"
        raise ConfigError(str(exc) if source in str(exc) else f"{source}: {exc}") from None
    return Runtime(device, resolve_precision(cfg.precision, device))


MAX_CONFIG_BYTES = 1 << 20  # a run config is a few hundred bytes; a larger file is refused
MAX_ALIASES = 64  # YAML aliases per document: enough for any config, too few to expand a bomb


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a mapping with a key twice (the last would win
    silently) and more than ``MAX_ALIASES`` aliases (nested aliases expand exponentially)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases = getattr(self, "aliases", 0) + 1
            if self.aliases > MAX_ALIASES:
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_ALIASES} aliases",
                                                  event.start_mark)  # fmt: skip
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                        key_node.start_mark)  # fmt: skip
            seen.add(key if isinstance(key, (str, int, float, bool)) else id(key))
        return super().construct_mapping(node, deep)


def load_yaml(text: str):
    """``text`` parsed as YAML by the strict loader (``yaml.YAMLError`` on any problem)."""
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what, and at which line and column."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def shown(value, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages (a value may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_differences(stored: dict, want: dict) -> list[str]:
    """``key: stored -> wanted`` for every setting where a run's recorded config differs from the
    config asked for. A key the record lacks (a run written before the key existed) counts as
    that key's default; values are shown cut short."""
    defaults = {f.name: f.default for f in dataclasses.fields(FLConfig)
                if f.default is not dataclasses.MISSING}  # fmt: skip
    out = []
    for key in sorted(set(stored) | set(want)):
        had = stored.get(key, defaults.get(key))
        if key not in want or had != want[key]:
            out.append(f"{key}: {shown(had, 60)} -> {shown(want.get(key), 60)}")
    return out


def parse_override(item: str) -> tuple[str, object]:
    """``key=value`` with a YAML value, e.g. ``rounds=3`` or ``clients=[sst2,qnli]``."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, _, text = item.partition("=")
    try:
        return key.strip(), load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {shown(item)}: value is not valid YAML ({yaml_problem(exc)})"
                          ) from exc  # fmt: skip


def load_config(path: str | Path, overrides: list[str] = ()) -> FLConfig:
    """Read a YAML config file, apply ``key=value`` overrides, validate."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {str(path)!r} is larger than {MAX_CONFIG_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from exc
    try:
        raw = load_yaml(data.decode("utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {exc.start})"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {yaml_problem(exc)}"
                          ) from exc  # fmt: skip
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    for item in overrides:
        key, value = parse_override(item)
        raw[key] = value
    return from_dict(raw)
