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

from bench_clients import MIX

from fedlease.fl import from_dict
from fedlease.fl.participation import participants
from fedlease.fl.simulator import simulation


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, help="local GLUE copy (<dir>/<task>/*.jsonl)")
    p.add_argument("--clients", type=int, default=1000, help="clients in the federation")
    p.add_argument("--per-round", type=int, default=50, help="clients drawn per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds timed")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    n = args.clients
    cfg = from_dict({
        "clients": {t: round(s * n) for t, s in MIX.items()}, "method": "fedit",
        "train_samples": 8, "test_samples": 4, "warmup_rounds": 1, "rounds": args.rounds,
        "local_epochs": 1, "batch_size": 8, "max_seq_len": 32, "clients_per_round": args.per_round,
        "eval_every": 1000, "seed": 0, "threads": args.threads, "data_dir": args.data_dir,
    })  # fmt: skip
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
