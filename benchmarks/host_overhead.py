"""Host time of one forward+backward of the Triton layer op, without a GPU.

On a GPU small layers are bound by what the host does per call (Python, autograd, launches), not
by the kernels. This measures that host-side part on the CPU: the Triton launches are replaced by
no-ops, the tensors are tiny, so what remains is the op's Python, its ATen calls and autograd;
PEFT's LoRA and the bare base linear are timed the same way, side by side. (Triton's own launcher
cost on a GPU comes on top and is not measured here: ``launch_overhead.py`` measures it there.)
Each row also counts the ATen operators of one forward+backward that would launch a device
kernel (everything but allocations and views), and the Triton launches. ``--clients N`` adds the
layer holding N clients (a lockstep step's layer), its op once for all clients against once per
client (as a backend without a client dimension runs it).

    python benchmarks/host_overhead.py
    python benchmarks/host_overhead.py --clients 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_layer import peft_lora
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fedlease import MoELoRALinear
from fedlease.cli_args import at_least
from fedlease.ops import dispatch, triton_backend


class _NoLaunch:
    """Stands in for a module of Triton kernels: ``kernel[grid](...)`` does nothing but count."""

    launches = 0

    def __getattr__(self, name):
        return self

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _NoLaunch.launches += 1

        return launch


# ATen operators that launch no device kernel: allocations and views
NO_KERNEL = {"empty", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
             "t", "transpose", "permute", "expand", "as_strided", "detach", "alias", "slice",
             "select", "unsqueeze", "squeeze", "split", "unbind", "_reshape_alias",
             "lift_fresh"}  # fmt: skip


class _KernelCount(TorchDispatchMode):
    """Names of the ATen operators run inside it that would launch a device kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def kernel_counts(step, module) -> tuple[list[str], int]:
    """The kernel-launching ATen operators and the Triton launches of one ``step(module)``."""
    before = _NoLaunch.launches
    with _KernelCount() as counter:
        step(module)
    return counter.ops, _NoLaunch.launches - before


def stub_triton_launches() -> None:
    """Keep the launch plans, make every kernel launch a no-op, let ``triton`` run on CPU."""
    launch = triton_backend._kernels()[3]
    stub = _NoLaunch()
    triton_backend._kernels = lambda: (stub, stub, stub, launch)
    dispatch._REGISTRY["triton"] = dispatch.Backend(
        "triton",
        triton_backend.moe_lora_triton,
        lambda device: None,
        linear_fn=triton_backend.moe_lora_linear_triton,
        clients=True,
    )


class _OncePerClient(nn.Module):
    """``layer`` with the stubbed triton backend's client dimension switched off for its forward:
    the op runs once per client (the backward follows the graph the forward built)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        with dispatch.once_per_client("triton"):
            return self.layer(x)


def client_rows(base: nn.Module, args) -> dict:
    """``--clients N``: the layer with N client slots, the op once for all against once per
    client; each row ``(module, x, dy)``, 8 tokens per client."""
    layer = MoELoRALinear(base, args.experts, args.rank, backend="triton")
    layer.stack_clients(args.clients)
    x = torch.randn(8 * args.clients, 16, requires_grad=True)
    dy = torch.randn(8 * args.clients, 16)
    n = args.clients
    return {
        f"fedlease triton, {n} clients in one call": (layer, x, dy),
        f"fedlease triton, {n} clients one by one": (_OncePerClient(layer), x, dy),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", type=at_least(1), default=4, help="number of experts M")
    p.add_argument("--rank", type=at_least(1), default=4, help="LoRA rank r")
    p.add_argument("--calls", type=at_least(1), default=50, help="calls per timed repetition")
    p.add_argument("--reps", type=at_least(1), default=30,
                   help="timed repetitions; the median is reported")  # fmt: skip
    p.add_argument("--clients", type=at_least(1), default=1,
                   help="also time the layer holding this many clients "
                   "(default 1: not)")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    stub_triton_launches()
    base = nn.Linear(16, 16, bias=False)
    base.requires_grad_(False)
    x = torch.randn(8, 16, requires_grad=True)
    dy = torch.randn(8, 16)
    rows = {
        "base linear": (base, x, dy),
        "PEFT LoRA": (peft_lora(base, args.rank, 16), x, dy),
        "fedlease triton (launches stubbed)": (
            MoELoRALinear(base, args.experts, args.rank, backend="triton"),
            x,
            dy,
        ),
    }
    if args.clients > 1:
        rows.update(client_rows(base, args))

    def step(row):
        module, x, dy = row
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(dy)

    for row in rows.values():
        for _ in range(200):
            step(row)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.reps):
        for name, row in rows.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                step(row)
            times[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    width = max(map(len, rows)) + 2
    for name, ts in times.items():
        ops, launches = kernel_counts(step, rows[name])
        print(f"{name:<{width}} {statistics.median(ts):8.1f} us per forward+backward; "
              f"{len(ops)} ATen kernels ({', '.join(ops)}), "
              f"{launches} Triton launches")  # fmt: skip


if __name__ == "__main__":
    main()
