"""The package's version (from its installed metadata: ``pyproject.toml`` is its one definition)
and what ``fedlease --version`` prints beside it: the versions it runs on and, per device type,
the MoE-LoRA backends that can run there (with why the others cannot), the one ``auto`` picks and
the precision ``auto`` picks, the first things to look at when an install seems slow."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch

from .ops.dispatch import BACKEND_NAMES, ENV_VAR, resolve_backend, unavailable_reason
from .precision import cpu_bf16_flags, cpu_bf16_speedup, resolve_precision


def dist_version(name: str, missing: str = "not installed") -> str:
    """The installed version of distribution ``name``, or ``missing``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return missing


# a source tree imported without being installed has no metadata: a valid PEP 440 stand-in
__version__ = dist_version("fedlease", missing="0+unknown")


def _backend_lines(device: torch.device) -> list[str]:
    reasons = {n: unavailable_reason(n, device) for n in BACKEND_NAMES}
    usable = ", ".join(n for n, why in reasons.items() if why is None)
    source = f" (${ENV_VAR} overrides it)" if os.environ.get(ENV_VAR) else ""
    try:
        auto = f"auto picks {resolve_backend('auto', device).name}{source}"
    except (ValueError, RuntimeError) as exc:  # $FEDLEASE_BACKEND naming a bad backend
        auto = f"auto picks none: {exc}"
    return [f"  backends {usable}; {auto}"] + [
        f"  {n} unavailable: {why}" for n, why in reasons.items() if why is not None
    ]


def _cpu_precision() -> str:
    flags = cpu_bf16_flags()
    why = (f"{', '.join(flags)}; a bf16 matmul measured {cpu_bf16_speedup():.2g}x float32's speed"
           if flags else "no native bf16")  # fmt: skip
    return f"precision auto picks {resolve_precision('auto', torch.device('cpu'))} ({why})"


def version_text() -> str:
    """``fedlease --version``'s report (measures one bf16 matmul on a CPU with native bf16)."""
    lines = [f"fedlease {__version__} (Python {platform.python_version()}, torch "
             f"{torch.__version__}, triton {dist_version('triton')})",
             f"cpu: {torch.get_num_threads()} threads; {_cpu_precision()}",
             *_backend_lines(torch.device("cpu"))]  # fmt: skip
    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        return "\n".join([*lines, f"cuda: no device visible (this torch is {built})"])
    cuda = torch.device("cuda")
    name = torch.cuda.get_device_name(cuda)
    lines += [f"cuda: {name} (torch built for CUDA {torch.version.cuda}); precision auto picks "
              f"{resolve_precision('auto', cuda)}",
              *_backend_lines(cuda)]  # fmt: skip
    return "\n".join(lines)
