r"""One FedLEASE round with its clients trained one after another against the same clients trained
in lockstep (``client_batch``), side by side in one command.

For each number of clients and each ``client_batch``, one run in its own process (so resident
memory starts from the same place): FedLEASE on GLUE clients (SST-2, QNLI, MRPC, RTE in turn),
one warm-up round and one adaptive round, configs/glue4.yaml's shape by default (128 tokens,
batch 16). Timed: the clients' training in the adaptive round (the transport's ``train``) and
the evaluation after it (its ``evaluate``); the warm-up round is not timed. Also the peak memory
(CUDA: allocated by torch; CPU: the process's peak resident set). Ratios are sequential time
over lockstep time, from runs of one invocation; with ``--repeats R`` each kind runs R times, in
turns, and the table gives medians and the range of the turns' ratios (a shared machine's speed
drifts by 10-20 % within minutes). ``--once-per-client`` adds a third run per
client count: the lockstep with every backend's layer op run once per client (its client form as
a loop), so the round shows what the client form saves.

With ``--task-type generation`` the clients are FLAN instruction tasks (configs/flan-demo.yaml's
eight in turn) on the bundled SmolLM2-135M (rank 8 on q_proj and v_proj, as that config), and the
evaluation decodes ``--new-tokens`` greedily.

    python benchmarks/bench_round.py --data-dir ../shared/data/glue --clients 4,8,16
    python benchmarks/bench_round.py --data-dir DIR --clients 16,64 --device cuda --json
    python benchmarks/bench_round.py --task-type generation --data-dir ../shared/data/flan \
        --clients 8 --seq 160 --batch 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time

from timing import device_name, sync, versions

from fedlease.cli_args import (
    at_least,
    check_config,
    child_result,
    exit_on_user_error,
    int_list,
    until_interrupted,
)  # fmt: skip
from fedlease.precision import MAX_THREADS

TASKS = ("sst2", "qnli", "mrpc", "rte")
FLAN_TASKS = ("fix_punct_wiki", "word_segment_wiki", "common_gen", "e2e_nlg", "sst2",
              "sentiment140", "piqa", "hellaswag")  # fmt: skip


def task_settings(args, n: int) -> dict:
    """The ``n`` clients and model of ``--task-type``."""
    if args.task_type == "generation":
        return {"task_type": "generation", "model": "smollm2", "rank": 8, "alpha": 16,
                "target_modules": ["q_proj", "v_proj"], "max_new_tokens": args.new_tokens,
                "clients": [FLAN_TASKS[i % len(FLAN_TASKS)] for i in range(n)],
                "eval_batch_size": args.batch}  # fmt: skip
    return {"clients": [TASKS[i % len(TASKS)] for i in range(n)],
            "eval_batch_size": args.batch * 4}  # fmt: skip


def config_for(args, n: int, at_once: str):
    """The validated config of one run: ``n`` clients, ``at_once`` (its ``client_batch``)."""
    from fedlease.fl import from_dict
    from fedlease.fl.config import parse_override

    return check_config(from_dict({
        "method": "fedlease", "train_samples": args.train_samples,
        "test_samples": args.test_samples, "warmup_rounds": 1, "rounds": 1, "local_epochs": 1,
        "batch_size": args.batch, "max_seq_len": args.seq, "max_experts": min(4, n),
        "seed": args.seed,
        "device": args.device, "precision": args.precision, "threads": args.threads,
        "data_dir": args.data_dir, **task_settings(args, n),
        "client_batch": at_once if at_once == "auto" else int(at_once),
        **dict(parse_override(item) for item in args.overrides),
    }))  # fmt: skip


def one_run(args) -> dict:
    """One (clients, client_batch) run in this process: its timings and memory."""
    import torch

    from fedlease.fl.config import runtime
    from fedlease.fl.simulator import simulation
    from fedlease.ops.dispatch import BACKEND_NAMES, once_per_client

    n = args.n
    cfg = config_for(args, n, args.client_batch)
    driver = simulation(cfg, progress=False)
    transport, times = driver.transport, {}
    device = runtime(cfg).device

    def timed(name, fn):
        def wrapper(r, *rest):
            sync(device)
            t0 = time.perf_counter()
            out = fn(r, *rest)
            sync(device)
            times.setdefault(name, []).append(time.perf_counter() - t0)
            return out

        return wrapper

    transport.train = timed("train", transport.train)
    transport.evaluate = timed("evaluate", transport.evaluate)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.ExitStack() as looped:
        if args.op_loop:  # every backend's client form as a loop over the clients
            for name in BACKEND_NAMES:
                looped.enter_context(once_per_client(name))
        summary = driver.run()
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip
    return {"clients": n, "client_batch": cfg.client_batch, "train_s": times["train"][-1],
            "evaluate_s": times["evaluate"][-1], "peak_mb": peak, "experts": summary.num_experts,
            "device": device_name(device), "precision": summary.precision}  # fmt: skip


def child(args, n: int, at_once: str, op_loop: bool = False) -> dict:
    argv = [sys.executable, __file__, *sys.argv[1:], "--n", str(n), "--client-batch", at_once]
    what = f"run of {n} clients, client_batch {at_once}"
    if op_loop:
        argv.append("--op-loop")
        what += ", layer op once per client"
    return child_result(argv, what)


def repeated_runs(args, n: int) -> dict:
    """Each kind of run (one by one, lockstep, op once per client) ``--repeats`` times, the kinds
    taking turns (first to last, then last to first: a machine that slows down or speeds up meets
    them alike); each kind's medians, and with repeats its runs and each turn's speed-up."""
    kinds = {"sequential": ("1", False), "lockstep": (args.batched, False)}
    if args.once_per_client:
        kinds["lockstep_op_once_per_client"] = (args.batched, True)
    runs = {kind: [] for kind in kinds}
    for turn in range(args.repeats):
        for kind in list(kinds)[:: 1 if turn % 2 == 0 else -1]:
            runs[kind].append(child(args, n, *kinds[kind]))
    out = {kind: {**done[0], **{key: statistics.median(r[key] for r in done)
                                for key in ("train_s", "evaluate_s", "peak_mb")}}
           for kind, done in runs.items()}  # fmt: skip
    if args.repeats > 1:
        out["runs"] = runs
        out["train_speedups"] = [s["train_s"] / k["train_s"]
                                 for s, k in zip(runs["sequential"], runs["lockstep"])]  # fmt: skip
    return out


def client_batch(text: str) -> str:
    """An argparse type: ``auto`` or a number of clients at once (>= 1)."""
    return text if text == "auto" else str(at_least(1)(text))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data-dir",
        required=True,
        help="local GLUE copy (<dir>/<task>/*.jsonl), or FLAN's for generation",
    )
    p.add_argument(
        "--task-type",
        default="classification",
        choices=["classification", "generation"],
        help="GLUE clients on MiniLM, or FLAN clients on SmolLM2-135M",
    )
    p.add_argument("--new-tokens", type=at_least(1), default=8,
                   help="tokens decoded per test example (generation; default: 8)")  # fmt: skip
    p.add_argument("--clients", type=int_list(3), default=[4, 8, 16],
                   help="client counts, comma-separated, each >= 3 (default: 4,8,16)")  # fmt: skip
    p.add_argument("--batched", type=client_batch, default="auto",
                   help="client_batch of the lockstep runs (auto: all at once)")  # fmt: skip
    p.add_argument("--train-samples", type=at_least(1), default=64,
                   help="training examples per client (default: 64)")  # fmt: skip
    p.add_argument("--test-samples", type=at_least(1), default=64,
                   help="held-out examples per client (default: 64)")  # fmt: skip
    p.add_argument("--seq", type=at_least(1), default=128, help="tokens per example (default: 128)")
    p.add_argument("--batch", type=at_least(1), default=16,
                   help="training batch size (default: 16)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16")
    p.add_argument("--threads", type=at_least(1, MAX_THREADS), default=None,
                   help="torch threads (default: torch's)")  # fmt: skip
    p.add_argument("--seed", type=at_least(0), default=0, help="run seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="another config value for every run, e.g. --set pack_sequences=false; "
                   "repeatable")  # fmt: skip
    p.add_argument("--once-per-client", action="store_true",
                   help="also run the lockstep with the layer op once per client (its client form "
                   "as a loop: what the client form saves in a round)")  # fmt: skip
    p.add_argument("--repeats", type=at_least(1), default=1,
                   help="runs of each kind per client count, taking turns; the table gives "
                   "medians and the range of the turns' speed-ups (default: 1)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)  # one run, in a child process
    p.add_argument("--client-batch", type=client_batch, help=argparse.SUPPRESS)
    p.add_argument("--op-loop", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    prog = "bench_round.py"
    if args.n is not None:
        with exit_on_user_error(prog):
            print(json.dumps(one_run(args)))
        return 0
    with exit_on_user_error(prog):  # every run's config, before the first starts
        for n in args.clients:
            config_for(args, n, "1")
            config_for(args, n, args.batched)

    def measure(n: int) -> dict:
        row = {"clients": n, **repeated_runs(args, n)}
        seq, lock = row["sequential"], row["lockstep"]
        row.update(train_speedup=seq["train_s"] / lock["train_s"],
                   evaluate_speedup=seq["evaluate_s"] / lock["evaluate_s"])  # fmt: skip
        if args.once_per_client:
            row["op_loop_train_speedup"] = seq["train_s"] / row["lockstep_op_once_per_client"][
                "train_s"]  # fmt: skip
        print(f"{n} clients done", file=sys.stderr)
        return row

    rows, interrupted = until_interrupted(args.clients, measure)
    if rows:
        print_report(args, rows)
    return 130 if interrupted else 0


def print_report(args, rows: list[dict]) -> None:
    report = {"device": rows[0]["sequential"]["device"], "versions": versions(),
              "precision": rows[0]["sequential"]["precision"], "seq": args.seq,
              "batch": args.batch, "train_samples": args.train_samples,
              "task_type": args.task_type, "repeats": args.repeats, "rows": rows}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"device: {report['device']}  precision {report['precision']}  {args.task_type}  "
          f"{args.seq} tokens, batch {args.batch}, "
          f"{args.train_samples} examples per client")  # fmt: skip
    if args.repeats > 1:
        print(f"medians of {args.repeats} runs of each kind; 'turns': the range of the training "
              "speed-ups of the runs made in turn")  # fmt: skip
    loops = "lockstep_op_once_per_client" in rows[0]
    print(f"{'clients':>8} {'train seq s':>12} {'lockstep s':>11} {'speed-up':>9}"
          + (f" {'turns':>12}" if args.repeats > 1 else "")
          + f" {'eval seq s':>11} {'lockstep s':>11} {'peak MB seq/lock':>17}"
          + (f" {'op once/client s':>17} {'speed-up':>9}" if loops else ""))  # fmt: skip
    for r in rows:
        s, k = r["sequential"], r["lockstep"]
        line = f"{r['clients']:>8} {s['train_s']:>12.2f} {k['train_s']:>11.2f} "
        line += f"{r['train_speedup']:>8.2f}x"
        if args.repeats > 1:
            line += f" {min(r['train_speedups']):>5.2f}-{max(r['train_speedups']):.2f}x"
        line += (f" {s['evaluate_s']:>11.2f} {k['evaluate_s']:>11.2f} "
                 f"{s['peak_mb']:>8.0f}/{k['peak_mb']:<8.0f}")  # fmt: skip
        if loops:
            line += (f" {r['lockstep_op_once_per_client']['train_s']:>17.2f} "
                     f"{r['op_loop_train_speedup']:>8.2f}x")  # fmt: skip
        print(line)


if __name__ == "__main__":
    sys.exit(main())
