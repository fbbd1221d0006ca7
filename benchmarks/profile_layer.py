"""Where one forward+backward of the MoE-LoRA layer spends its time, kernel by kernel.

Profiles ``--steps`` forward+backward calls of ``MoELoRALinear`` (and PEFT's LoRA for reference)
with ``torch.profiler`` and prints each row's kernels by total device time per call.

    python benchmarks/profile_layer.py --backends triton,cpp --d-in 4096 --d-out 4096 --experts 8
"""

from __future__ import annotations

import argparse

import torch
from bench_layer import peft_lora
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fedlease import MoELoRALinear
from fedlease.cli_args import at_least, existing_device, name_list
from fedlease.ops import available_backends
from fedlease.ops.dispatch import BACKEND_NAMES


def kernel_table(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, steps: int) -> str:
    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(dy)

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU]
    if x.is_cuda:
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if x.is_cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if x.is_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--device", type=existing_device, default="cuda" if gpu else "cpu",
                   help="cuda, cuda:N or cpu (default: cuda when available)")  # fmt: skip
    p.add_argument("--backends", type=name_list(("auto", *BACKEND_NAMES)), default=["triton"],
                   help="comma-separated fedlease backends (default: triton)")  # fmt: skip
    p.add_argument("--d-in", type=at_least(1), default=4096, help="input features")
    p.add_argument("--d-out", type=at_least(1), default=4096, help="output features")
    p.add_argument("--rank", type=at_least(1), default=8, help="LoRA rank r")
    p.add_argument("--experts", type=at_least(1), default=4, help="number of experts M")
    p.add_argument("--tokens", type=at_least(1), default=16384, help="tokens per call")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"],
                   help="parameter and input dtype")  # fmt: skip
    p.add_argument("--steps", type=at_least(1), default=5, help="profiled forward+backward calls")
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT LoRA reference row")
    args = p.parse_args(argv)
    here = available_backends(args.device)
    for name in args.backends:
        if name != "auto" and name not in here:
            p.error(f"--backends: {name!r} is not available on {args.device} (here: "
                    f"{', '.join(here)})")  # fmt: skip
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = nn.Linear(args.d_in, args.d_out, bias=False, device=device, dtype=dtype)
    base.requires_grad_(False)
    x = torch.randn(args.tokens, args.d_in, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.tokens, args.d_out, device=device, dtype=dtype)
    rows: dict[str, nn.Module] = {}
    if not args.no_peft:
        rows["peft_lora"] = peft_lora(base, args.rank, 16).to(device, dtype)
    for name in args.backends:
        layer = MoELoRALinear(base, args.experts, args.rank, alpha=16, backend=name)
        nn.init.normal_(layer.lora_B, std=0.02)
        rows[f"fedlease_{name}"] = layer.to(device, dtype)
    shape = f"{args.d_in}x{args.d_out}, M={args.experts}, r={args.rank}, {args.tokens} tokens"
    for name, module in rows.items():
        print(f"== {name}: {shape}, {args.dtype}, totals over {args.steps} fwd+bwd calls")
        print(kernel_table(module, x, dy, args.steps))


if __name__ == "__main__":
    main()
