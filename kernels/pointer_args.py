"""Launching a kernel with its tensors' addresses instead of the tensors.

For every tensor argument, at every launch, Triton's CUDA launcher calls the tensor's
``data_ptr()`` and asks the driver about the address (``cuPointerGetAttribute``), and its JIT
calls ``data_ptr()`` again to specialise on alignment; an argument given as an integer skips all
of that. A kernel takes integers where it expects pointers only if its pointer parameters are
annotated with their element types (``*bf16``), so ``launch`` uses a variant of the kernel per
combination of dtypes, annotated so, whose specialisation (element types, 16-byte alignment)
and so whose compiled code are those of the kernel given the tensors.

Parameters named ``*_ptr`` are the pointers (the convention of every kernel here). GPU only: the
interpreter needs the tensors themselves.
"""

from __future__ import annotations

import types

import torch
import triton

TRITON_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int32: "i32",
}


def pointer_names(kernel) -> list[str]:
    """The pointer parameters of a ``triton.jit`` kernel, in order."""
    return [name for name in kernel.arg_names if name.endswith("_ptr")]


def typed_variant(kernel, element_types: tuple[str, ...]):
    """``kernel`` with its pointer parameters annotated ``*<type>``, ``element_types`` in order:
    the same source, compiled the same way, launched with integers for pointers (a new one per
    call: ``prepare`` keeps those in use)."""
    fn = kernel.fn
    names = pointer_names(kernel)
    if len(names) != len(element_types):
        raise ValueError(f"{fn.__name__} has {len(names)} pointers, got {len(element_types)} types")
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)  # fmt: skip
    copy.__annotations__ = {**fn.__annotations__,
                            **{n: f"*{t}" for n, t in zip(names, element_types)}}  # fmt: skip
    copy.__qualname__, copy.__module__, copy.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    return triton.jit(
        copy,
        do_not_specialize=kernel.do_not_specialize,
        do_not_specialize_on_alignment=kernel.do_not_specialize_on_alignment,
    )


_VARIANTS: dict[tuple, object] = {}  # (id(kernel), element types...) -> typed variant


def addresses(args: tuple) -> tuple[tuple[str, ...], tuple]:
    """The element types of the tensors among ``args``, and ``args`` with each tensor replaced by
    its address."""
    element_types, plain = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            element_types.append(TRITON_TYPES[a.dtype])
            plain.append(a.data_ptr())
        else:
            plain.append(a)
    return tuple(element_types), tuple(plain)


def prepare(kernel, args: tuple):
    """The typed variant of ``kernel`` for the tensors among ``args``, and the arguments to give
    it (a dictionary keyed by the kernel's id spares hashing the kernel at every launch)."""
    element_types, plain = addresses(args)
    key = (id(kernel), *element_types)
    variant = _VARIANTS.get(key)
    if variant is None:
        variant = _VARIANTS[key] = typed_variant(kernel, element_types)
    return variant, plain


def launch(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)`` with every tensor of ``args`` given as its address to the
    kernel's typed variant. The caller keeps the tensors alive (they are, as the op's locals)."""
    variant, plain = prepare(kernel, args)
    return variant[grid](*plain, **meta)


__all__ = ["addresses", "launch", "pointer_names", "prepare", "typed_variant"]
