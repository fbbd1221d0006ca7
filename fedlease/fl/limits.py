"""What a run's config asks of the model and the machine, checked once the frozen model is loaded
and before any adapter, client state or data is made: the sequence length within the model's
positions, target modules that are linear layers of it, a rank no larger than those layers, and
the clients' adapters within the memory this machine has."""

from __future__ import annotations

import os

from torch import nn

from ..inject import _matches
from .config import ConfigError, FLConfig

# Bytes per client beyond its adapter tensors (optimiser moments are per training client, the kept
# state, a clone at aggregation and the checkpoint's copy are per client): a factor on the adapter.
COPIES_PER_CLIENT = 3


def available_bytes() -> int | None:
    """Memory the kernel says is available now (``MemAvailable``); None where it does not say."""
    return _meminfo("MemAvailable")


def machine_bytes() -> int | None:
    """The most memory this process may have: the machine's (``MemTotal``), or its control
    group's limit where that is lower; None where neither says. Unlike ``available_bytes`` it does
    not change with what else runs, so what depends on it is the same in every run."""
    known = [b for b in (_meminfo("MemTotal"), _cgroup_limit()) if b]
    return min(known) if known else None


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_limit() -> int | None:
    """This process's control group memory limit (cgroup v2 ``memory.max``, v1
    ``memory.limit_in_bytes``); None for none ("max", or v1's huge sentinel) or unreadable."""
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    files = []
    for _, controllers, path in (e for e in entries if len(e) == 3):
        if controllers == "":
            files += [f"/sys/fs/cgroup{path}/memory.max", "/sys/fs/cgroup/memory.max"]
        elif "memory" in controllers.split(","):
            files += [f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes",
                      "/sys/fs/cgroup/memory/memory.limit_in_bytes"]  # fmt: skip
    for name in files:
        try:
            with open(name) as f:
                text = f.read().strip()
        except OSError:
            continue
        return int(text) if text.isdigit() and int(text) < 2**60 else None
    return None


def _targets(cfg: FLConfig, base: nn.Module) -> list[nn.Linear]:
    found = [(n, m) for n, m in base.named_modules() if n and _matches(n, cfg.target_modules)]
    for t in cfg.target_modules:
        if not any(_matches(n, [t]) for n, _ in found):
            raise ConfigError(f"config key 'target_modules': {t!r} matches no module of model "
                              f"{cfg.model!r}")  # fmt: skip
    for name, module in found:
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"config key 'target_modules': {name!r} of model {cfg.model!r} is a "
                              f"{type(module).__name__}, not a linear layer")  # fmt: skip
    return [m for _, m in found]


def adapter_bytes(cfg: FLConfig, layers: list[nn.Linear], head_params: int) -> int:
    """float32 bytes of one client's adapter at the most experts the run can have: per layer
    M experts of A (r x in) and B (out x r), a router of 2M - 1 rows, and the task head."""
    m = cfg.num_experts if isinstance(cfg.num_experts, int) else cfg.max_experts
    per_layer = [m * cfg.rank * (x.in_features + x.out_features) + (2 * m - 1) * x.in_features
                 for x in layers]  # fmt: skip
    return 4 * (sum(per_layer) + head_params)


def check_model_fits(cfg: FLConfig, base: nn.Module, clients: int) -> None:
    """``ConfigError`` naming the key when ``cfg`` cannot run on ``base`` with ``clients`` clients
    held in this process (before anything is allocated for them)."""
    positions = getattr(base.config, "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.max_seq_len > positions:
        raise ConfigError(f"config key 'max_seq_len' = {cfg.max_seq_len}: model {cfg.model!r} has "
                          f"{positions} positions")  # fmt: skip
    layers = _targets(cfg, base)
    smallest = min(min(x.in_features, x.out_features) for x in layers)
    if cfg.rank > smallest:
        raise ConfigError(f"config key 'rank' = {cfg.rank}: larger than the smallest adapted "
                          f"layer of model {cfg.model!r} ({smallest})")  # fmt: skip
    head = sum(
        p.numel() for n, p in base.named_parameters() if n.startswith(("classifier", "score"))
    )
    need = COPIES_PER_CLIENT * clients * adapter_bytes(cfg, layers, head)
    have = available_bytes()
    if have is not None and need > have and not os.environ.get("FEDLEASE_NO_MEMORY_CHECK"):
        raise ConfigError(
            f"config keys 'clients' ({clients}), 'rank' ({cfg.rank}), 'max_experts'/'num_experts': "
            f"the clients' adapters need about {need / 2**30:.1f} GiB, this machine has "
            f"{have / 2**30:.1f} GiB available (FEDLEASE_NO_MEMORY_CHECK=1 skips this check)"
        )
