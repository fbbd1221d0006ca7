"""MoE-LoRA layer speed, side by side in one run.

Rows: the frozen base linear alone; PEFT LoRA with one adapter; a naive MoE-LoRA that loops over
the top-M slots and the experts (as the method's reference code does); and each fedlease backend
available on the device (Triton also in its other order of base GEMM and kernels, and launched
with addresses instead of tensors, ``triton_backend.INT_POINTERS`` flipped). Each row is
timed forward-only and forward+backward (median of ``--reps`` after ``--warmup``, the rows timed
round-robin so that they share the machine's slow and fast phases alike), with the input
requiring grad as it does inside a network. ``--dropout P`` puts dropout on every row's LoRA
input (PEFT's ``lora_dropout``, the layer's own, before the naive loop's experts); the modules
stay in training mode, so the forward-only rows draw it too.

Memory: on CUDA ``peak_mb`` is torch's peak allocation over one forward+backward minus what was
allocated before it; on CPU it is the size of the tensors autograd saves for backward plus the
output (what the layer adds to training memory), measured with saved-tensor hooks.

    python benchmarks/bench_layer.py                      # target shape of the device
    python benchmarks/bench_layer.py --experts 8 --json   # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

import torch
import torch.nn.functional as F
from timing import device_name, interleaved_medians, versions
from torch import nn

from fedlease import MoELoRALinear
from fedlease.cli_args import at_least, existing_device
from fedlease.ops import available_backends, resolve_backend

TARGETS = {  # device type -> default shape
    "cuda": {"d_in": 4096, "d_out": 4096, "rank": 8, "experts": 4, "tokens": 16384,
             "dtype": "bfloat16"},
    "cpu": {"d_in": 1024, "d_out": 1024, "rank": 8, "experts": 4, "tokens": 4096,
            "dtype": "float32"},
}  # fmt: skip


class NaiveMoELoRA(nn.Module):
    """The straightforward MoE-LoRA: per top-M slot, per expert, a full LoRA pass, then masking."""

    def __init__(self, layer: MoELoRALinear, dropout: float = 0.0) -> None:
        super().__init__()
        self.base, self.spec, self.scaling = layer.base, layer.spec, layer.scaling
        self.dropout = nn.Dropout(dropout)
        self.experts_a = nn.ParameterList(nn.Parameter(a.clone()) for a in layer.lora_A.detach())
        self.experts_b = nn.ParameterList(nn.Parameter(b.clone()) for b in layer.lora_B.detach())
        self.router = nn.Parameter(layer.router.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)
        top_p, top_i = probs.topk(self.spec.keep, dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        fold = torch.tensor(self.spec.fold, device=x.device)[top_i]
        x = self.dropout(x)  # the experts see dropout(x), the router x
        for slot in range(self.spec.keep):
            for e in range(self.spec.num_experts):
                out = F.linear(F.linear(x, self.experts_a[e]), self.experts_b[e]) * self.scaling
                w = (top_p[..., slot] * (fold[..., slot] == e)).to(x.dtype)
                y = y + w.unsqueeze(-1) * out
        return y


class Flipped(nn.Module):
    """The Triton layer with one of ``triton_backend``'s switches flipped while it runs, for a
    side-by-side row: ``BASE_GEMM_FIRST`` (the other order of base GEMM and kernels) or
    ``INT_POINTERS`` (launches with addresses instead of tensors)."""

    def __init__(self, layer: MoELoRALinear, switch: str) -> None:
        super().__init__()
        self.layer, self.switch = layer, switch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fedlease.ops import triton_backend

        saved = getattr(triton_backend, self.switch)
        setattr(triton_backend, self.switch, not saved)
        try:
            return self.layer(x)
        finally:
            setattr(triton_backend, self.switch, saved)


def peft_lora(base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> nn.Module:
    import peft

    net = nn.Sequential()
    net.add_module("proj", base)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"],
                             lora_dropout=dropout)  # fmt: skip
    model = peft.get_peft_model(net, config)
    nn.init.normal_(model.base_model.model.proj.lora_B["default"].weight, std=0.02)
    return model


def memory_mb(module: nn.Module, x: torch.Tensor) -> float:
    device = x.device
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        module(x).sum().backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    ext = sum(n for p, n in seen.items() if p != x.untyped_storage().data_ptr())
    return (ext + y.numel() * y.element_size()) / 2**20


def bench(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = nn.Linear(args.d_in, args.d_out, bias=False, device=device, dtype=dtype)
    base.requires_grad_(False)
    layer = MoELoRALinear(base, args.experts, args.rank, alpha=16, dropout=args.dropout,
                          own_expert=0).to(device, dtype)  # fmt: skip
    nn.init.normal_(layer.lora_B, std=0.02)
    x = torch.randn(args.tokens, args.d_in, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.tokens, args.d_out, device=device, dtype=dtype)

    rows: dict[str, nn.Module] = {"base": base}
    try:
        rows["peft_lora"] = peft_lora(base, args.rank, 16, args.dropout).to(device, dtype)
    except ImportError:
        print("peft is not installed: no PEFT row", file=sys.stderr)
    rows["naive_loop"] = NaiveMoELoRA(layer, args.dropout)
    backends = [
        b for b in available_backends(device) if not (b == "triton" and device.type != "cuda")
    ]
    for name in backends:
        row = MoELoRALinear(base, args.experts, args.rank, alpha=16, dropout=args.dropout,
                            backend=name).to(device, dtype)  # fmt: skip
        row.load_state_dict(layer.state_dict())
        rows[f"fedlease_{name}"] = row
        if name == "triton":
            from fedlease.ops import triton_backend

            order = "lora_first" if triton_backend.BASE_GEMM_FIRST else "base_first"
            rows[f"fedlease_triton_{order}"] = Flipped(row, "BASE_GEMM_FIRST")
            launches = "tensors" if triton_backend.INT_POINTERS else "int_pointers"
            rows[f"fedlease_triton_{launches}"] = Flipped(row, "INT_POINTERS")

    def fwd(module):
        with torch.no_grad():
            module(x)

    def fwd_bwd(module):
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(dy)

    rows = {name: module for name, module in rows.items() if _runs(name, fwd_bwd, module)}
    fwd_ms = interleaved_medians(
        {n: partial(fwd, m) for n, m in rows.items()}, device, args.warmup, args.reps
    )
    fwd_bwd_ms = interleaved_medians(
        {n: partial(fwd_bwd, m) for n, m in rows.items()}, device, args.warmup, args.reps
    )
    results = {}
    for name, module in rows.items():
        results[name] = {
            "fwd_ms": fwd_ms[name],
            "fwd_bwd_ms": fwd_bwd_ms[name],
            "peak_mb": memory_mb(module, x),
            "tokens_per_s": args.tokens / fwd_bwd_ms[name] * 1e3,
        }
    return {
        "device": device_name(device),
        "versions": versions(),
        "auto_backend": resolve_backend("auto", device, dtype).name,
        "dtype": args.dtype,
        "shape": {k: getattr(args, k) for k in ("d_in", "d_out", "rank", "experts", "tokens")},
        "dropout": args.dropout,
        "threads": torch.get_num_threads(),
        "results": results,
        "ratios": ratios(results),
    }


def _runs(name: str, fwd_bwd, module) -> bool:
    """Whether a row's forward+backward runs. A fedlease row that fails is left out and said why
    (one failing row, e.g. a launch path new to this GPU, should not lose the shape's others);
    the reference rows (base, PEFT, the loop) must run."""
    try:
        fwd_bwd(module)
    except Exception as e:
        if not name.startswith("fedlease_"):
            raise
        print(f"bench_layer: row {name} left out: {type(e).__name__}: {e}", file=sys.stderr)
        return False
    return True


def ratios(results: dict) -> dict:
    """Per fedlease row: added fwd+bwd time over the base vs PEFT's, and speed-up over the loop."""
    out = {}
    base = results["base"]["fwd_bwd_ms"]
    for name, r in results.items():
        if not name.startswith("fedlease_"):
            continue
        entry = {"vs_naive_loop": results["naive_loop"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]}
        if "peft_lora" in results:
            peft = results["peft_lora"]["fwd_bwd_ms"]
            entry["vs_peft_fwd_bwd"] = r["fwd_bwd_ms"] / peft
            entry["added_over_base_vs_peft"] = (r["fwd_bwd_ms"] - base) / max(peft - base, 1e-9)
        out[name] = entry
    return out


def print_table(report: dict) -> None:
    print(f"device: {report['device']}  dtype: {report['dtype']}  shape: {report['shape']}  "
          f"threads: {report['threads']}  auto: {report['auto_backend']}")  # fmt: skip
    print(f"{'row':<18}{'fwd ms':>10}{'fwd+bwd ms':>12}{'ktok/s':>9}{'peak MB':>10}")
    for name, r in report["results"].items():
        print(f"{name:<18}{r['fwd_ms']:>10.3f}{r['fwd_bwd_ms']:>12.3f}"
              f"{r['tokens_per_s'] / 1e3:>9.1f}{r['peak_mb']:>10.1f}")  # fmt: skip
    for name, r in report["ratios"].items():
        parts = [f"{k} {v:.2f}x" for k, v in r.items()]
        print(f"{name}: " + ", ".join(parts))


def probability(text: str) -> float:
    """An argparse type: a dropout probability, 0 <= P < 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number with 0 <= P < 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--device", type=existing_device, default="cuda" if gpu else "cpu",
                   help="cuda, cuda:N or cpu (default: cuda when available)")  # fmt: skip
    p.add_argument("--d-in", type=at_least(1), help="input features (default: the device's target)")
    p.add_argument("--d-out", type=at_least(1), help="output features")
    p.add_argument("--rank", type=at_least(1), help="LoRA rank r")
    p.add_argument("--experts", type=at_least(1), help="number of experts M")
    p.add_argument("--tokens", type=at_least(1), help="tokens per batch (batch x sequence)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="parameter dtype")
    p.add_argument("--dropout", type=probability, default=0.0,
                   help="dropout on every row's LoRA input, 0 <= P < 1 (default: 0)")  # fmt: skip
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed calls before timing")
    p.add_argument("--reps", type=at_least(1), default=10,
                   help="timed calls; the median is reported")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    target = TARGETS["cuda" if args.device.startswith("cuda") else "cpu"]
    for key, value in target.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    report = bench(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
