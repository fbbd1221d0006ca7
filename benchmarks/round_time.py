"""Seconds per sampled round (training and checkpoint, no evaluation) of a federation of N
clients at 50 participants per round: FedIT (no warm-up that trains everyone), four GLUE tasks,
8 training examples per client. Run it for two sizes back to back under the same conditions:

    python benchmarks/round_time.py --data-dir ../shared/data/glue --clients 1000
    python benchmarks/round_time.py --data-dir ../shared/data/glue --clients 100
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_clients import mixed_clients

from fedlease.cli_args import at_least, check_config, exit_on_user_error
from fedlease.fl import from_dict
from fedlease.fl.participation import participants
from fedlease.fl.simulator import simulation
from fedlease.precision import MAX_THREADS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, help="local GLUE copy (<dir>/<task>/*.jsonl)")
    p.add_argument("--clients", type=at_least(10), default=1000,
                   help="clients in the federation (>= 10: every task gets one)")  # fmt: skip
    p.add_argument("--per-round", type=at_least(1), default=50, help="clients drawn per round")
    p.add_argument("--rounds", type=at_least(1), default=2, help="rounds timed")
    p.add_argument("--threads", type=at_least(1, MAX_THREADS), default=1, help="torch threads")
    args = p.parse_args(argv)
    n = args.clients
    with exit_on_user_error("round_time.py"):
        cfg = check_config(from_dict({
            "clients": mixed_clients(n), "method": "fedit",
            "train_samples": 8, "test_samples": 4, "warmup_rounds": 1, "rounds": args.rounds,
            "local_epochs": 1, "batch_size": 8, "max_seq_len": 32,
            "clients_per_round": args.per_round, "eval_every": 1000, "seed": 0,
            "threads": args.threads, "data_dir": args.data_dir,
        }))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        fed = simulation(cfg, Path(tmp) / "run", progress=False)
        for r in range(args.rounds):
            t0 = time.perf_counter()
            fed.train_round(r, participants(cfg, r, True))
            t1 = time.perf_counter()
            fed.save_checkpoint(r + 1)
            t2 = time.perf_counter()
            print(f"{n} clients, round {r}: training {t1 - t0:.1f} s, checkpoint {t2 - t1:.2f} s",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
