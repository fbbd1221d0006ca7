"""Backend registry and selection for the MoE-LoRA op.

A backend is a callable ``fn(x, base_out, lora_A, lora_B, router, spec, scaling, dropout_p)`` on
2-D ``x (T, in)`` and ``base_out (T, out)`` returning ``y (T, out)``, plus a function telling why
it cannot run on a device (``None`` when it can). A backend may also compute the whole layer,
frozen base GEMM included, as ``linear_fn(x, weight, bias, lora_A, lora_B, router, spec, scaling,
dropout_p, fast_dropout)`` (``fast_dropout=False``: aten's dropout where the backend would draw
its own mask); the others get the base output from ``F.linear``. On the device types of
``linear_casts`` its ``linear_fn`` also takes ``dtype=`` (autocast's, or None) and casts inside;
elsewhere the caller casts every input first. A backend with ``clients`` takes client-stacked
inputs (see ``fedlease.ops.moe_lora``) in the same functions; one with ``linear_shares`` takes
them in ``linear_fn`` on those device types, the clients' tokens in given counts (``shares=``).
``auto`` takes the first available backend of the device type's preference list;
``FEDLEASE_BACKEND`` overrides the choice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

BACKEND_NAMES = ("torch", "triton", "cpp")
ENV_VAR = "FEDLEASE_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., torch.Tensor]
    unavailable_reason: Callable[[torch.device], str | None]
    linear_fn: Callable[..., torch.Tensor] | None = None
    # device types where ``linear_fn`` takes ``dtype=`` (autocast's) and casts inside
    linear_casts: tuple[str, ...] = ()
    # ``fn`` and ``linear_fn`` also take client-stacked tensors (a leading client dimension) and
    # one RoutingSpec per client, in one go (else the op runs once per client)
    clients: bool = False
    # device types where ``linear_fn`` takes client-stacked adapters with the clients' tokens as
    # one 2-D x, each client's in turn, their counts as ``shares=`` (unequal too), in one go
    linear_shares: tuple[str, ...] = ()
    # dtypes it computes in, per device type; a device type not listed: any dtype
    dtypes: dict[str, tuple[torch.dtype, ...]] = field(default_factory=dict)

    def client_form(self, device: torch.device) -> bool:
        """Whether the layer op takes several clients in one call on ``device``."""
        return self.clients or device.type in self.linear_shares

    def dtype_reason(self, device: torch.device, dtype: torch.dtype | None) -> str | None:
        allowed = self.dtypes.get(device.type)
        if dtype is None or allowed is None or dtype in allowed:
            return None
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        return f"it computes in {names} on {device.type}, not {str(dtype).removeprefix('torch.')}"


_REGISTRY: dict[str, Backend] = {}
# Per device type, the order `auto` tries backends in (fastest first, by measurement); `torch`
# closes every list.
_PREFERENCE: dict[str, list[str]] = {}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def prefer(device_type: str, names: tuple[str, ...]) -> None:
    """Make `auto` on ``device_type`` try ``names`` in this order before ``torch``."""
    _PREFERENCE[device_type] = list(names)


def unavailable_reason(name: str, device: torch.device) -> str | None:
    if name not in _REGISTRY:
        return f"backend {name!r} is not part of this build"
    return _REGISTRY[name].unavailable_reason(device)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device``."""
    device = torch.device(device)
    return [n for n in BACKEND_NAMES if unavailable_reason(n, device) is None]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
    """Pick the backend for ``name`` ("auto" or a backend name) on ``device`` for inputs of
    ``dtype`` (None: any)."""
    env = os.environ.get(ENV_VAR)
    if env:
        name = env.strip().lower()
    if name == "auto":
        for candidate in _PREFERENCE.get(device.type, []) + ["torch"]:
            usable = unavailable_reason(candidate, device) is None
            if usable and _REGISTRY[candidate].dtype_reason(device, dtype) is None:
                return _REGISTRY[candidate]
        raise RuntimeError(f"no MoE-LoRA backend can run on device {device}")
    if name not in BACKEND_NAMES:
        source = f" (from ${ENV_VAR})" if env else ""
        raise ValueError(
            f"unknown backend {name!r}{source}; choose from {('auto',) + BACKEND_NAMES}"
        )
    reason = unavailable_reason(name, device) or _REGISTRY[name].dtype_reason(device, dtype)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is unavailable on {device}: {reason}")
    return _REGISTRY[name]


@contextlib.contextmanager
def once_per_client(name: str):
    """Inside it, backend ``name`` runs client-stacked calls once per client (as a backend without
    a client form does): for benchmarks that weigh the client form against that loop. A backward
    follows the graph its forward built, inside or not."""
    backend = _REGISTRY[name]
    _REGISTRY[name] = dataclasses.replace(backend, clients=False, linear_shares=())
    try:
        yield
    finally:
        _REGISTRY[name] = backend


def concat_adapters(
    lora_a: torch.Tensor, lora_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked ``A (..., M, r, in)``, ``B (..., M, out, r)`` -> ``A_cat (..., M*r, in)``, ``B_cat
    (..., out, M*r)`` (leading dimensions: clients): rank column ``e*r + j`` belongs to expert
    ``e``."""
    return lora_a.flatten(-3, -2), lora_b.movedim(-3, -2).flatten(-2)
