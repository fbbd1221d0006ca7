"""Padded against padding-free batches (``pack_sequences``), side by side in one process: each
repetition trains the same GLUE clients one by one (``ClientRunner.train``, one local epoch) on
two client models built as ``fedlease run`` builds them, one padding every batch to its longest
sequence, one packing its real tokens (``fedlease.packing``); the two alternate in order from
repetition to repetition, and each repetition draws another data order (as rounds do), so new
batch shapes keep coming. On the CPU (where ``fedlease run`` packs). Prints the median time of a
repetition of each and their ratio, and how many tokens the padded batches held per real one.

    python benchmarks/bench_packing.py --data-dir ../shared/data/glue
    python benchmarks/bench_packing.py --data-dir DIR --seq 64 --reps 9 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from timing import versions

from fedlease.cli_args import at_least, exit_on_user_error
from fedlease.precision import MAX_THREADS

TASKS = ("sst2", "qnli", "mrpc", "rte")


def runners(args) -> tuple[dict, list]:
    """The padded and the packed client model (same seed, same adapters) and the clients' data."""
    from fedlease.data.sources import build_client_data
    from fedlease.fl import from_dict
    from fedlease.fl.config import runtime
    from fedlease.fl.pool import ModelPool, load_base
    from fedlease.fl.types import Layout

    out, data = {}, None
    for pack in (False, True):
        cfg = from_dict({"method": "fedlease", "clients": list(TASKS),
                         "train_samples": args.train_samples, "batch_size": args.batch,
                         "max_seq_len": args.seq, "threads": args.threads,
                         "precision": args.precision, "data_dir": args.data_dir,
                         "pack_sequences": pack})  # fmt: skip
        rt = runtime(cfg)
        base, tok = load_base(cfg, rt)
        pool = ModelPool(cfg, base, tok, False, rt)
        layout = Layout(args.experts, "adaptive")
        out["packed" if pack else "padded"] = (pool.runner(layout), pool.template(layout))
        data = data or build_client_data(list(TASKS), tok, args.train_samples, 8, args.seq, 0,
                                         data_dir=args.data_dir)  # fmt: skip
    return out, data


def padding(data, batch: int) -> float:
    """Tokens of the padded batches (each to its longest) per real token, over the clients."""
    padded = real = 0
    for c in data:
        lengths = [len(s) for s in c.train.features["input_ids"]]
        for s in range(0, len(lengths), batch):
            part = lengths[s : s + batch]
            padded, real = padded + len(part) * max(part), real + sum(part)
    return padded / real


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, help="local GLUE copy (<dir>/<task>/*.jsonl)")
    p.add_argument("--seq", type=at_least(1), default=128,
                   help="tokens per example at most (default 128)")  # fmt: skip
    p.add_argument("--batch", type=at_least(1), default=16,
                   help="training batch size (default: 16)")  # fmt: skip
    p.add_argument("--train-samples", type=at_least(1), default=64,
                   help="examples per client (64)")  # fmt: skip
    p.add_argument("--experts", type=at_least(1), default=4, help="experts M (default: 4)")
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16")
    p.add_argument("--threads", type=at_least(1, MAX_THREADS), default=None,
                   help="torch threads (default: torch's)")  # fmt: skip
    p.add_argument("--reps", type=at_least(2), default=7,
                   help="repetitions, >= 2; the first is not counted (default: 7)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args()
    with exit_on_user_error("bench_packing.py"):
        models, data = runners(args)
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(args.reps):
        for name in sorted(models, reverse=rep % 2 == 1):
            runner, state = models[name]
            t0 = time.perf_counter()
            for c in data:
                runner.train(c, state, seed=rep, own_expert=0)
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t[1:]) for name, t in times.items()}
    report = {"device": _device_name(), "versions": versions(), "seq": args.seq,
              "batch": args.batch, "train_samples": args.train_samples, "reps": args.reps,
              "padded_tokens_per_real": padding(data, args.batch), "seconds": times,
              "median_s": medians, "speedup": medians["padded"] / medians["packed"],
              "precision": models["packed"][0].precision}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['device']}, {report['precision']}, {args.seq} tokens at most, batch "
          f"{args.batch}, {len(data)} clients x {args.train_samples} examples; padded batches "
          f"hold {report['padded_tokens_per_real']:.2f} tokens per real one")  # fmt: skip
    for name in ("padded", "packed"):
        print(f"  {name:>7}: {medians[name]:.3f} s a repetition (median of {args.reps - 1})")
    print(f"  packed vs padded: {report['speedup']:.3f}x")
    return 0


def _device_name() -> str:
    import torch
    from timing import device_name

    return device_name(torch.device("cpu"))


if __name__ == "__main__":
    sys.exit(main())
