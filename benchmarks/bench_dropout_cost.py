"""What dropout still costs in a whole training step: fedlease M experts (bench_train's row, the
counter-based dropout) with every dropout on, with the adapters' input dropout off, with every
dropout at p = 0, and the same step in eval mode (no dropout anywhere), timed round-robin in one
process. The differences are the cost of the adapters' dropout and of the model's own.

    python benchmarks/bench_dropout_cost.py --precision bf16 --threads 2
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from bench_train import build_row, train_step
from timing import device_name, interleaved_medians, versions

from fedlease.allocator import keep_freed_memory
from fedlease.cli_args import at_least
from fedlease.inject import moe_lora_layers
from fedlease.models import load
from fedlease.precision import MAX_THREADS

CPU = torch.device("cpu")


def without_model_dropout(model) -> None:
    """p = 0 in every dropout of the frozen model (modules and attention probabilities)."""
    for module in model.modules():
        if isinstance(getattr(module, "p", None), float):
            module.p = 0.0
        for name in ("dropout_prob", "attention_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    model.config.attention_probs_dropout_prob = 0.0


def without_adapter_dropout(model) -> None:
    for layer in moe_lora_layers(model).values():
        layer.dropout = 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--precision",
        default="bf16",
        choices=["bf16", "fp32"],
        help="precision of the steps (default: bf16)",
    )
    ap.add_argument("--threads", type=at_least(1, MAX_THREADS), default=2, help="torch threads")
    ap.add_argument("--experts", type=at_least(1), default=4, help="experts M")
    ap.add_argument("--batch", type=at_least(1), default=16, help="sequences a step")
    ap.add_argument("--seq", type=at_least(1, 512), default=64,
                    help="tokens a sequence, at most MiniLM's 512")  # fmt: skip
    ap.add_argument("--steps", type=at_least(1), default=10, help="timed steps per row (median)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `fedlease run` does; FEDLEASE_KEEP_FREED_MEMORY=0: not
    torch.manual_seed(0)
    base, _ = load("minilm", num_labels=2)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(
            1000, base.config.vocab_size, (args.batch, args.seq), generator=g
        ),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (args.batch,), generator=g),
    }
    row_args = argparse.Namespace(rank=4, targets=["query", "value"])
    rows = {}
    for name, change in (("all dropout", None), ("no adapter dropout", without_adapter_dropout),
                         ("no model dropout", without_model_dropout), ("no dropout", "both"),
                         ("eval mode", "eval")):  # fmt: skip
        model, opt = build_row(base, str(args.experts), row_args, args.precision, CPU, "eager")
        if change == "both":
            without_model_dropout(model)
            without_adapter_dropout(model)
        elif change == "eval":
            model.eval()
        elif change is not None:
            change(model)
        rows[name] = partial(train_step, model, opt, batch, CPU, args.precision)
    ms = interleaved_medians(rows, CPU, warmup=2, reps=args.steps)
    print(f"{device_name(CPU)}, {args.threads} threads, {args.precision}, MiniLM {args.batch} x "
          f"{args.seq}, M {args.experts}, eager attention, {versions()}")  # fmt: skip
    for name, t in ms.items():
        print(f"{name:<20} {t:8.1f} ms  ({t / ms['no dropout']:.2f}x the step without dropout)")


if __name__ == "__main__":
    main()
