"""Many clients in one process: resident memory and seconds per round as the federation grows at
a fixed number of participants per round.

Each size runs in its own process (so resident memory starts from the same place): FedLEASE (or
``--method``) on four GLUE tasks (30 % SST-2, 40 % QNLI, 20 % MRPC, 10 % RTE), small per-client
data, ``--per-round`` clients drawn per round, evaluation only after the last round. Reported per
size: resident set size after the clients' data and models are built (before training) and at the
end, the bytes of every client's kept state (adapters, routers, head), the wall time of each round
(the warm-up round, in which FedLEASE trains every client, reported apart) and of the checkpoint
it writes.

    python benchmarks/bench_clients.py --data-dir ../shared/data/glue --sizes 100,300,1000
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from fedlease.cli_args import (
    at_least,
    check_config,
    child_result,
    exit_on_user_error,
    int_list,
    until_interrupted,
)  # fmt: skip
from fedlease.precision import MAX_THREADS

# Clients per task in these proportions: every task's validation split can give each of its
# clients at least one disjoint test example at 1,000 clients (RTE's local copy has 139).
MIX = {"sst2": 0.3, "qnli": 0.4, "mrpc": 0.2, "rte": 0.1}


def rss_mb() -> float:
    """This process's resident set size now (from /proc), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def mixed_clients(n: int) -> dict[str, int]:
    """``n`` clients over the four tasks in ``MIX``'s proportions."""
    return {task: round(share * n) for task, share in MIX.items()}


def config_for(args, n: int):
    """The validated config of a federation of ``n`` clients."""
    from fedlease.fl import from_dict

    return check_config(from_dict({
        "clients": mixed_clients(n), "method": args.method,
        "train_samples": args.train_samples, "test_samples": args.test_samples,
        "warmup_rounds": 1, "rounds": args.rounds, "local_epochs": 1, "batch_size": 8,
        "max_seq_len": 32, "max_experts": 4, "clients_per_round": args.per_round,
        "eval_every": 1000, "seed": args.seed, "threads": args.threads,
        "data_dir": args.data_dir,
    }))  # fmt: skip


def one_size(args) -> dict:
    """Run one federation size in this process and return its measurements."""
    import torch

    from fedlease.fl.simulator import simulation
    from fedlease.fl.types import payload_bytes

    cfg = config_for(args, args.size)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        fed = simulation(cfg, Path(tmp) / "run", progress=False)
        setup_s = time.time() - t0
        rss_setup = rss_mb()
        ckpt_s = []
        save = fed.save_checkpoint

        def timed_save(rounds_done):
            t = time.perf_counter()
            save(rounds_done)
            ckpt_s.append(time.perf_counter() - t)

        fed.save_checkpoint = timed_save
        summary = fed.run()
        rows = fed.rec.rows
    walls = [rows[0]["wall_s"] - setup_s] + [
        b["wall_s"] - a["wall_s"] for a, b in itertools.pairwise(rows)
    ]
    state_bytes = [payload_bytes(st) for st in fed.transport.kept]
    return {
        "clients": len(cfg.clients),
        "per_round": len(rows[-1]["participants"]),
        "method": args.method,
        "experts": summary.num_experts,
        "setup_s": setup_s,
        "round_s": walls,
        "phases": [r["phase"] for r in rows],
        "evaluated": [r["evaluated"] for r in rows],
        "checkpoint_s": ckpt_s,
        "rss_setup_mb": rss_setup,
        "rss_end_mb": rss_mb(),
        "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "state_bytes_per_client": sum(state_bytes) / len(state_bytes),
        "mean_accuracy": summary.final["mean"],
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, help="local GLUE copy (<dir>/<task>/*.jsonl)")
    p.add_argument("--sizes", type=int_list(10), default=[100, 300, 1000],
                   help="federation sizes, comma-separated, each >= 10 (so that every task "
                   "has a client; default: 100,300,1000)")  # fmt: skip
    p.add_argument("--per-round", type=at_least(1), default=50, help="clients drawn per round")
    p.add_argument("--rounds", type=at_least(1), default=3,
                   help="adaptive rounds after the warm-up")  # fmt: skip
    p.add_argument("--method", default="fedlease", help="fedlease or a baseline")
    p.add_argument("--train-samples", type=at_least(1), default=8,
                   help="training examples per client")  # fmt: skip
    p.add_argument("--test-samples", type=at_least(1), default=4,
                   help="held-out examples per client")  # fmt: skip
    p.add_argument("--threads", type=at_least(1, MAX_THREADS), default=2, help="torch threads")
    p.add_argument("--seed", type=at_least(0), default=0, help="run seed")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)  # one size, in a child process
    args = p.parse_args(argv)
    prog = "bench_clients.py"
    if args.size is not None:
        with exit_on_user_error(prog):
            print(json.dumps(one_size(args)))
        return 0
    with exit_on_user_error(prog):  # every size's config, before the first run starts
        for size in args.sizes:
            config_for(args, size)

    def measure(size: int) -> dict:
        child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                 "--size", str(size)]  # fmt: skip
        result = child_result(child, f"the federation of {size} clients")
        print(f"{size} clients done", file=sys.stderr)
        return result

    results, interrupted = until_interrupted(args.sizes, measure)
    if results:
        print_table(results, args.json)
    return 130 if interrupted else 0


def print_table(results: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2))
        return
    head = ("clients", "setup s", "warm-up s", "adaptive s/round", "ckpt s", "RSS setup MB",
            "RSS end MB", "state KB/client")  # fmt: skip
    widths = (8, 8, 10, 17, 7, 13, 11, 16)
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, widths)))
    for r in results:
        adaptive = [w for w, ph, ev in zip(r["round_s"], r["phases"], r["evaluated"])
                    if ph != "warmup" and not ev]  # fmt: skip
        print(f"{r['clients']:>8} {r['setup_s']:>8.1f} {r['round_s'][0]:>10.1f} "
              f"{sum(adaptive) / max(len(adaptive), 1):>17.2f} "
              f"{sum(r['checkpoint_s']) / len(r['checkpoint_s']):>7.2f} "
              f"{r['rss_setup_mb']:>13.0f} {r['rss_end_mb']:>11.0f} "
              f"{r['state_bytes_per_client'] / 1024:>16.1f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
