"""Forward hooks that the package installs and removes again."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn


def remove_hooks(module: nn.Module, fns: Iterable[Callable]) -> None:
    """Remove ``module``'s forward hooks and forward pre-hooks that call one of ``fns``."""
    fns = tuple(fns)
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn in fns]:
            del hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_with_kwargs.pop(key, None)
