r"""One training step of N clients in lockstep (one stacked model, batch N x 16) against N steps of
one client (batch 16), all sequences of the same length: what the lockstep gains or loses per
step with padding and data order out of the picture. Timed round-robin in one process; with
``--profile`` also the torch profiler's table of both (where the time goes as the batch grows).

``--backends`` compares the layers' backends side by side: the ``triton`` kernels, the ``torch``
op's batched GEMMs and ``cpp``'s layer op (on the CPU) all run every client of a layer in one
call; ``--once-per-client`` also times the lockstep step with the op run once per client
and layer (each call a full set of launches and its own base GEMM), what the client form saves;
``--ceiling`` also times one client's step at the lockstep's batch (N x 16 sequences through one
client's adapters): what the lockstep could reach if holding N clients cost nothing.

    python benchmarks/bench_lockstep_step.py --clients 2,4,8 --seq 128 --precision bf16
    python benchmarks/bench_lockstep_step.py --device cuda --clients 16,64 --backends triton,torch \
        --once-per-client
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from timing import device_name, interleaved_medians, versions

from fedlease import inject_moe_lora, models
from fedlease.allocator import keep_freed_memory
from fedlease.cli_args import at_least, existing_device, int_list, name_list
from fedlease.clients import set_active, set_own_experts, stack_clients
from fedlease.dropout import use_fast_dropout
from fedlease.inject import MoELoRAConfig, moe_lora_layers
from fedlease.ops import BACKEND_NAMES, resolve_backend
from fedlease.ops.dispatch import once_per_client
from fedlease.precision import MAX_THREADS, autocast


def client_model(precision: str) -> torch.nn.Module:
    """MiniLM with FedLEASE's adaptive layers (M 2, r 4) on query/value, the counter-based
    dropout, frozen weights in bf16 when the step runs in bf16 (as ``ModelPool`` stores them)."""
    base, _ = models.load("minilm", num_labels=2, attn="eager")
    cfg = MoELoRAConfig(
        num_experts=2, rank=4, alpha=16, dropout=0.05, routing="adaptive",
        target_modules=["query", "value"], trainable_modules=["classifier"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = inject_moe_lora(base, cfg)
    use_fast_dropout(model, True)
    if precision == "bf16":
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.bfloat16()
    return model.train()


def stacked(single: torch.nn.Module, n: int) -> torch.nn.Module:
    """``n`` client slots around the same frozen tensors (as ``ModelPool.lockstep``)."""
    shared = {id(t): t for t in (*single.parameters(), *single.buffers()) if not t.requires_grad}
    model = stack_clients(copy.deepcopy(single, memo=shared), n)
    set_own_experts(model, [0] * n)
    set_active(model, list(range(n)))
    return model.train()


def step(model, ids, labels, precision) -> None:
    with autocast(ids.device, precision):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(logits.float(), labels).backward()


def use_backend(model: torch.nn.Module, backend: str) -> None:
    for layer in moe_lora_layers(model).values():
        layer.backend = backend


def compare(single, n: int, backend: str, args) -> dict[str, float]:
    """Median ms of N steps of one client and of one lockstep step of N, with ``backend``, timed
    side by side."""
    many = stacked(single, n)
    for model in (single, many):
        use_backend(model, backend)
    ids = torch.randint(1000, 20000, (args.batch, args.seq), device=args.device)
    labels = torch.randint(0, 2, (args.batch,), device=args.device)
    big_ids, big_labels = ids.repeat(n, 1), labels.repeat(n)

    fns = {
        "one by one": lambda: [step(single, ids, labels, args.precision) for _ in range(n)],
        "lockstep": lambda: step(many, big_ids, big_labels, args.precision),
    }
    impl = resolve_backend(backend, args.device)
    if args.once_per_client and impl.client_form(args.device):

        def loop() -> None:
            with once_per_client(impl.name):
                step(many, big_ids, big_labels, args.precision)

        fns["lockstep, op once per client"] = loop
    if args.ceiling:
        fns["ceiling: 1 client at N x batch"] = lambda: step(single, big_ids, big_labels,
                                                             args.precision)  # fmt: skip
    ms = interleaved_medians(fns, args.device, warmup=1, reps=args.reps)
    if args.profile and n == args.clients[-1]:
        profile(fns, n)
    return ms


def profile(fns: dict, n: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n{name}, N = {n}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int_list(1), default=[2, 4, 8],
                    help="comma-separated client counts N (default: 2,4,8)")  # fmt: skip
    ap.add_argument("--seq", type=at_least(1, 512), default=128,
                    help="tokens per sequence, at most MiniLM's 512 (default: 128)")  # fmt: skip
    ap.add_argument("--batch", type=at_least(1), default=16, help="sequences per client and step")
    ap.add_argument(
        "--precision",
        default="bf16",
        choices=["bf16", "fp32"],
        help="precision of the steps (default: bf16)",
    )
    ap.add_argument("--device", type=existing_device, default="cpu",
                    help="cpu, cuda or cuda:N (default: cpu)")  # fmt: skip
    ap.add_argument("--backends", type=name_list(("auto", *BACKEND_NAMES)), default=["auto"],
                    help="the layers' backends, comma-separated, each timed "
                    "(default: auto)")  # fmt: skip
    ap.add_argument("--once-per-client", action="store_true",
                    help="also time the lockstep step with the layer op run once per client "
                    "(backends with a client form)")  # fmt: skip
    ap.add_argument(
        "--ceiling",
        action="store_true",
        help="also time one client's step at the lockstep's batch (the ceiling)",
    )
    ap.add_argument("--threads", type=at_least(1, MAX_THREADS), default=2, help="torch threads")
    ap.add_argument("--reps", type=at_least(1), default=5, help="timed repetitions (median)")
    ap.add_argument("--profile", action="store_true", help="print the op tables of the largest N")
    args = ap.parse_args()
    args.device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `fedlease run` does; FEDLEASE_KEEP_FREED_MEMORY=0: not
    torch.manual_seed(0)
    single = client_model(args.precision).to(args.device)
    print(f"{device_name(args.device)}, {args.threads} threads, {args.precision}, {versions()}")
    print(f"{'backend':>32} {'N':>3} {'N steps of 1 client':>20} {'1 step of N':>12} "
          f"{'ratio':>6}")  # fmt: skip
    for backend in args.backends:
        for n in args.clients:
            ms = compare(single, n, backend, args)
            for row in (r for r in ms if r != "one by one"):
                name = row if row.startswith("ceiling") else backend + row.removeprefix("lockstep")
                print(f"{name:>32} {n:>3} {ms['one by one']:>17.0f} ms {ms[row]:>9.0f} ms "
                      f"{ms['one by one'] / ms[row]:>5.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
