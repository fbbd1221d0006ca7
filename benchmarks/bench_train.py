"""Training speed of a whole model, side by side in one run: PEFT LoRA, fedlease with one expert
(plain LoRA through the MoE-LoRA layer) and fedlease with M adaptive experts, in each precision;
fedlease with M experts keeping aten's dropout everywhere (``..._aten_dropout``: the step as it
was before the counter-based CPU dropout, ``fedlease.use_fast_dropout(model, False)``); and for a
classifier, fedlease with M experts computing the last layer for every token
(``..._full_last_layer``: without ``fedlease.use_first_token_output``, which the other fedlease
rows use as ``fedlease run`` does: the last layer computes only the token the classifier reads);
for a causal LM, fedlease with M experts computing every position's logits (``..._all_logits``:
the model's own loss, where the other fedlease rows compute logits at the answer tokens only, as
``fedlease run`` does, ``fedlease.generation.loss``).

Every row trains the same model on the same batch (random token ids, all positions real) with
AdamW over its trainable tensors: LoRA (or MoE-LoRA) on the target modules plus the task head,
dropout on (the model's own and 0.05 on the adapters' input). PEFT runs as users run it: stock
``nn.Dropout`` and the attention of ``--attn``; the fedlease rows use the counter-based dropout
(on the CPU it also swaps the attention for ``fedlease_eager``, the eager one with that dropout).
``bf16`` is the mixed precision ``fedlease run`` uses: frozen base stored in bfloat16, trainable
tensors float32, forward and backward under ``torch.autocast``. Steps are timed round-robin (one
step of each row per repetition); the table gives samples/s from the median step.

``--task-type generation`` trains a causal LM instead (the bundled SmolLM2, or any causal
``--model``): next-token loss over each sequence's answer, its last ``--answer`` share of tokens
(the rest is the prompt, as in instruction tuning), no task head, target modules
``q_proj,v_proj`` unless ``--targets`` says otherwise. PEFT's row takes the model's own loss, as
its users do.

    python benchmarks/bench_train.py                          # MiniLM, fp32 and bf16, CPU
    python benchmarks/bench_train.py --device cuda --json     # one JSON object on stdout
    python benchmarks/bench_train.py --attn eager,sdpa        # attention implementations too
    python benchmarks/bench_train.py --task-type generation --model smollm2 --batch 8 --seq 160
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from functools import partial

import torch
from timing import device_name, interleaved_medians, versions

from fedlease import MoELoRAConfig, inject_moe_lora, use_fast_dropout
from fedlease.allocator import keep_freed_memory
from fedlease.cli_args import at_least, existing_device, name_list, share
from fedlease.data.tokenize import IGNORE_INDEX
from fedlease.first_token import unsupported, use_first_token_output
from fedlease.generation.loss import answer_loss
from fedlease.models import load, load_causal
from fedlease.precision import MAX_THREADS, autocast, cast_frozen, resolve_device


def build_row(base, kind: str, args, precision: str, device: torch.device, attn: str):
    """``(model, optimizer, loss)`` for one row: ``peft``, or ``fedlease`` with ``kind`` experts
    (``"<M>-aten"``: with aten's dropout; ``"<M>-full"``: the last layer for every token;
    ``"<M>-all"``: every position's logits); ``loss(model, batch)`` is the row's loss."""
    model = copy.deepcopy(base)
    model.set_attn_implementation(attn)
    torch.manual_seed(0)
    heads = [] if args.task_type == "generation" else ["classifier"]
    if kind == "peft":
        import peft

        config = peft.LoraConfig(
            r=args.rank, lora_alpha=16, lora_dropout=0.05, target_modules=args.targets,
            modules_to_save=heads or None,
        )  # fmt: skip
        model = peft.get_peft_model(model, config)
    else:
        experts = int(kind.split("-")[0])
        config = MoELoRAConfig(
            num_experts=experts, rank=args.rank, alpha=16, dropout=0.05,
            routing="dense" if experts == 1 else "adaptive", target_modules=args.targets,
            trainable_modules=heads,
        )  # fmt: skip
        inject_moe_lora(model, config)
    model.to(device)
    if kind != "peft":
        use_fast_dropout(model, not kind.endswith("-aten"))
        if unsupported(model) is None:
            use_first_token_output(model, not kind.endswith("-full"))
    if precision == "bf16":
        cast_frozen(model, torch.bfloat16)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params), "trainable tensors stay float32"
    return model, torch.optim.AdamW(params, lr=1e-4), row_loss(kind, args)


def row_loss(kind: str, args):
    """The model's own loss, or for fedlease's causal LM rows but ``"<M>-all"`` the loss over
    the answer with logits at the answer tokens only."""
    if kind == "peft" or kind.endswith("-all") or args.task_type != "generation":
        return lambda model, batch: model(**batch).loss
    return answer_loss


def row_name(kind: str) -> str:
    if kind == "peft":
        return "peft_lora"
    experts, _, variant = kind.partition("-")
    suffix = {"": "", "aten": "_aten_dropout", "full": "_full_last_layer",
              "all": "_all_logits"}[variant]  # fmt: skip
    return f"fedlease_m{experts}{suffix}"


def train_step(model, opt, loss_fn, batch, device, precision) -> None:
    opt.zero_grad(set_to_none=True)
    with autocast(device, precision):
        loss = loss_fn(model, batch)
    loss.backward()
    opt.step()


def bench(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `fedlease run` does (every row); FEDLEASE_KEEP_FREED_MEMORY=0: not
    torch.manual_seed(0)
    causal = args.task_type == "generation"
    base, _ = load_causal(args.model) if causal else load(args.model, num_labels=2)
    positions = getattr(base.config, "max_position_embeddings", args.seq)
    if args.seq > positions:
        raise ValueError(f"--seq {args.seq}: {args.model} has {positions} positions")
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (args.batch, args.seq), generator=g)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
        "labels": answer_labels(ids, args.answer) if causal
        else torch.randint(0, 2, (args.batch,), generator=g),
    }  # fmt: skip
    batch = {k: v.to(device) for k, v in batch.items()}
    rows = {}
    for precision in args.precisions:
        for attn in args.attn:
            for kind in kinds(args):
                name = f"{row_name(kind)}/{precision}"
                name += f"/{attn}" if len(args.attn) > 1 else ""
                rows[name] = build_row(base, kind, args, precision, device, attn)
    step_ms = interleaved_medians(
        {n: partial(train_step, *mo, batch, device, n.split("/")[1]) for n, mo in rows.items()},
        device, args.warmup, args.steps,
    )  # fmt: skip
    results = {
        n: {"step_ms": ms, "samples_per_s": args.batch / ms * 1e3} for n, ms in step_ms.items()
    }
    return {
        "device": device_name(device),
        "versions": versions(),
        "model": args.model,
        "task_type": args.task_type,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "answer": args.answer if causal else None,
        "experts": args.experts,
        "attn": args.attn,
        "threads": torch.get_num_threads(),
        "results": results,
        "ratios": ratios(results, args),
    }


def answer_labels(ids: torch.Tensor, share: float) -> torch.Tensor:
    """Targets for the last ``share`` of each sequence's tokens (at least one), ignored before."""
    labels = ids.clone()
    labels[:, : ids.shape[1] - max(1, round(share * ids.shape[1]))] = IGNORE_INDEX
    return labels


def kinds(args) -> list[str]:
    """The rows' kinds (:func:`build_row`): the full last layer's for a classifier, every
    position's logits for a causal LM."""
    m = str(args.experts)
    variant = "full" if args.task_type == "classification" else "all"
    return ["peft", "1", m, f"{m}-aten", f"{m}-{variant}"]


def ratios(results: dict, args) -> dict:
    """Speed-ups (samples/s over samples/s) of fedlease M: over PEFT in the same precision and
    in fp32, over itself with aten's dropout and with the full last layer; per row: bf16 over
    fp32."""
    out = {}
    for name, r in results.items():
        row, precision, *attn = name.split("/")
        if row == f"fedlease_m{args.experts}":
            against = {"peft": ("peft_lora", precision), "aten dropout": (row + "_aten_dropout",
                       precision), "full last layer": (row + "_full_last_layer", precision),
                       "all logits": (row + "_all_logits", precision),
                       "peft fp32": ("peft_lora", "fp32")}  # fmt: skip
            for label, (other, other_precision) in against.items():
                base = results.get("/".join([other, other_precision, *attn]))
                if base and not (label == "peft fp32" and precision == "fp32"):
                    out[f"{name} vs {label}"] = r["samples_per_s"] / base["samples_per_s"]
        if precision == "bf16":
            fp32 = results.get("/".join([row, "fp32", *attn]))
            if fp32:
                out[f"{row}{'/' + attn[0] if attn else ''} bf16 vs fp32"] = (
                    r["samples_per_s"] / fp32["samples_per_s"]
                )
    return out


def print_table(report: dict) -> None:
    print(f"device: {report['device']}  model: {report['model']}  batch {report['batch']} x "
          f"{report['seq']} tokens  r {report['rank']}  threads {report['threads']}")  # fmt: skip
    print(f"{'row':<40}{'step ms':>10}{'samples/s':>11}")
    for name, r in report["results"].items():
        print(f"{name:<40}{r['step_ms']:>10.1f}{r['samples_per_s']:>11.1f}")
    for name, v in report["ratios"].items():
        print(f"{name}: {v:.2f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None,
                   help="'minilm' or 'smollm2' (bundled) or a from_pretrained name or path "
                        "(default: minilm, or smollm2 with --task-type generation)")  # fmt: skip
    p.add_argument("--task-type", choices=["classification", "generation"],
                   default="classification",
                   help="a classifier with its head (default), or a causal LM's next-token "
                        "loss")  # fmt: skip
    p.add_argument("--device", type=existing_device, default="auto",
                   help="auto, cpu, cuda or cuda:N (default: auto)")  # fmt: skip
    p.add_argument("--precisions", type=name_list(("fp32", "bf16")), default=["fp32", "bf16"],
                   help="comma-separated: fp32, bf16 (default: both)")  # fmt: skip
    p.add_argument("--attn", type=name_list(("sdpa", "eager")), default=["sdpa"],
                   help="attention implementations, comma-separated: sdpa, eager")  # fmt: skip
    p.add_argument("--batch", type=at_least(1), default=16,
                   help="sequences per step (default: 16)")  # fmt: skip
    p.add_argument("--seq", type=at_least(1), default=64,
                   help="tokens per sequence, at most the model's (default: 64)")  # fmt: skip
    p.add_argument("--rank", type=at_least(1), default=4, help="LoRA rank (default: 4)")
    p.add_argument("--answer", type=share, default=0.25,
                   help="with --task-type generation: the share of each sequence's tokens that "
                        "is its answer, the loss's targets (default: 0.25, as in make flan-demo's "
                        "clients; 1: every position)")  # fmt: skip
    p.add_argument("--experts", type=at_least(1), default=4,
                   help="experts of the MoE rows (default: 4)")  # fmt: skip
    p.add_argument("--targets", type=name_list(None), default=None,
                   help="target modules, comma-separated (default: query,value; q_proj,v_proj "
                        "with --task-type generation)")  # fmt: skip
    p.add_argument(
        "--threads", type=at_least(1, MAX_THREADS), help="torch threads (default: torch's)"
    )
    p.add_argument("--warmup", type=at_least(0), default=2,
                   help="untimed steps per row (default: 2)")  # fmt: skip
    p.add_argument("--steps", type=at_least(1), default=10,
                   help="timed steps per row (default: 10)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    causal = args.task_type == "generation"  # its defaults: the bundled SmolLM2, q_proj/v_proj
    args.model = args.model or ("smollm2" if causal else "minilm")
    args.targets = args.targets or (["q_proj", "v_proj"] if causal else ["query", "value"])
    try:
        report = bench(args)
    except ValueError as exc:
        p.error(str(exc))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    sys.exit(main())
