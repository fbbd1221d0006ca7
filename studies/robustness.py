"""Robust aggregation against one attacking client: a grid of federated runs, one table.

Four clients on one task (SST-2 by default) share one LoRA (``--method fedit``: every upload
enters the same aggregate); client 3 tampers with its upload every round (``attacks:``, see
``fedlease.fl.faults``). For each attack (and none) and each aggregation rule the run's final mean
accuracy over the clients is reported, with its distance to the clean run under ``mean``.

    python studies/robustness.py --data-dir ../shared/data/glue --seeds 1,2 \\
        --json runs/robustness.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from fedlease import cli_args
from fedlease.cli_args import BadInput, at_least, check_config, int_list, name_list, output_file

RULES = ("mean", "median", "trimmed_mean", "norm_clip", "krum")
ATTACKS = {
    "none": None,
    "scale x100": {"kind": "scale", "factor": 100.0},
    "sign flip x1": {"kind": "sign_flip", "factor": 1.0},
    "sign flip x100": {"kind": "sign_flip", "factor": 100.0},
}


def add_setting_arguments(p: argparse.ArgumentParser) -> None:
    """The four-client setting's flags (shared with ``robust_bias.py``)."""
    p.add_argument("--data-dir", required=True, help="local GLUE copy (<dir>/<task>/*.jsonl)")
    p.add_argument("--task", default="sst2", help="the four clients' task")
    p.add_argument("--seeds", type=int_list(0), default=[1, 2],
                   help="run seeds, comma-separated (default: 1,2)")  # fmt: skip
    p.add_argument("--train-samples", type=at_least(1), default=128,
                   help="training examples per client")  # fmt: skip
    p.add_argument("--test-samples", type=at_least(1), default=200,
                   help="held-out examples per client")  # fmt: skip
    p.add_argument("--rounds", type=at_least(1), default=4, help="rounds after the first")
    p.add_argument("--max-seq-len", type=at_least(1), default=64, help="tokens per example")
    p.add_argument("--threads", type=at_least(1), default=1, help="torch threads")
    p.add_argument("--device", default="auto", help="device of the runs: auto, cpu, cuda")
    p.add_argument("--precision", default="auto", help="precision of the runs: auto, fp32, bf16")


def check_settings(args, method: str) -> None:
    """Every seed's run config, checked before the first run starts (``ConfigError`` /
    ``DataError`` naming what is wrong)."""
    from fedlease.fl import from_dict

    for seed in args.seeds:
        check_config(from_dict(setting(args, seed, method)))


def setting(args, seed: int, method: str) -> dict:
    """The run config of the four-client setting (one warm-up round, 1 local epoch a round)."""
    return {
        "clients": [args.task] * 4, "method": method, "train_samples": args.train_samples,
        "test_samples": args.test_samples, "warmup_rounds": 1, "rounds": args.rounds,
        "local_epochs": 1, "max_seq_len": args.max_seq_len, "threads": args.threads,
        "seed": seed, "data_dir": args.data_dir, "device": args.device,
        "precision": args.precision,
    }  # fmt: skip


def one_run(args, rule: str, attack: dict | None, seed: int) -> dict:
    from fedlease.fl import from_dict
    from fedlease.fl.simulator import simulation

    raw = setting(args, seed, args.method)
    raw["aggregation"] = rule if rule != "trimmed_mean" else {"rule": rule, "trim": 0.25}
    if attack is not None:
        raw["attacks"] = {"clients": [3], **attack}
    t0 = time.time()
    summary = simulation(from_dict(raw), progress=False).run()
    honest = [c["accuracy"] for c in summary.final["per_client"] if c["client"] != 3]
    return {"mean": summary.final["mean"], "honest_mean": sum(honest) / len(honest),
            "wall_s": time.time() - t0}  # fmt: skip


def rules_in(results: list[dict]) -> list[str]:
    """The rules that have runs, in the order of RULES."""
    return [rule for rule in RULES if any(r["rule"] == rule for r in results)]


def cell(v: float, clean: float | None) -> str:
    """An accuracy in %, with its difference to the clean run's when there is one."""
    return f"{100 * v:.1f}" + (f" ({100 * (v - clean):+.1f})" if clean is not None else "")


def table(results: list[dict], seeds: list[int]) -> str:
    """One table per seed whose grid is complete, then their mean when there are several. The
    columns are the attacks that have runs; the clean run under ``mean`` is the reference."""

    def value(rule, attack, seed_list):
        vals = [
            r["honest_mean"]
            for r in results
            if r["rule"] == rule and r["attack"] == attack and r["seed"] in seed_list
        ]
        return sum(vals) / len(vals) if vals else None

    rules = rules_in(results)
    attacks = [a for a in ATTACKS if any(r["attack"] == a for r in results)]
    cells = [(rule, a) for rule in rules for a in attacks if any(
        r["rule"] == rule and r["attack"] == a for r in results)]  # fmt: skip
    complete = [s for s in seeds if all(
        any(r["rule"] == rule and r["attack"] == a and r["seed"] == s for r in results)
        for rule, a in cells)]  # fmt: skip
    out = []
    groups = [([s], f"seed {s}") for s in complete]
    if len(complete) > 1:
        groups.append((complete, f"mean over seeds {complete}"))
    for seed_list, name in groups:
        clean = value("mean", "none", seed_list)  # None: not run (--clean-mean runs it)
        lines = [f"{name}: mean accuracy (%) of the three honest clients; in brackets the "
                 "difference to the clean run under `mean`" if clean is not None else
                 f"{name}: mean accuracy (%) of the three honest clients", "",
                 "| aggregation | " + " | ".join(attacks) + " |",
                 "|---" * (len(attacks) + 1) + "|"]  # fmt: skip
        for rule in rules:
            row = [cell(value(rule, a, seed_list), clean) if (rule, a) in cells else "-"
                   for a in attacks]  # fmt: skip
            lines.append(f"| {rule} | " + " | ".join(row) + " |")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_setting_arguments(p)
    p.add_argument("--method", default="fedit", help="method (fedit: one shared aggregate)")
    p.add_argument("--rules", type=name_list(RULES), default=list(RULES),
                   help=f"aggregation rules, comma-separated, of: {', '.join(RULES)}")  # fmt: skip
    p.add_argument("--attacks", type=name_list(tuple(ATTACKS)), default=list(ATTACKS),
                   help=f"attacks to run, comma-separated, of: {', '.join(ATTACKS)}")  # fmt: skip
    p.add_argument(
        "--clean-mean",
        action="store_true",
        help="also run the clean run under mean (the reference) whatever --rules says",
    )
    p.add_argument("--json", type=output_file,
                   help="write every run's numbers here (finished runs are reused)")  # fmt: skip
    args = p.parse_args(argv)
    with cli_args.exit_on_user_error("robustness.py"):
        check_settings(args, args.method)
        results = previous_results(args.json)
        run_grid(args, results)
    print(table(results, args.seeds), end="")
    return 0


def previous_results(path: Path | None) -> list[dict]:
    """The runs an earlier call wrote to ``--json`` (none when it does not exist yet)."""
    if path is None or not path.exists():
        return []
    results = cli_args.read_json(path)
    if not isinstance(results, list) or not all(
        isinstance(r, dict) and {"rule", "attack", "seed", "honest_mean"} <= set(r) for r in results
    ):
        raise BadInput(f"--json {str(path)!r} holds something else than this study's results; "
                       "name another file")  # fmt: skip
    return results


def run_grid(args, results: list[dict]) -> None:
    """Every (seed, attack, rule) run that ``results`` lacks, appended to it (and to ``--json``
    after each run)."""
    seeds, rules, attacks = args.seeds, args.rules, args.attacks
    grid = list(itertools.product(seeds, attacks, rules))
    if args.clean_mean:
        grid = [(s, "none", "mean") for s in seeds] + grid
    done = {(r["rule"], r["attack"], r["seed"]) for r in results}
    for seed, attack, rule in grid:
        if (rule, attack, seed) in done:
            continue
        done.add((rule, attack, seed))
        res = one_run(args, rule, ATTACKS[attack], seed)
        results.append({"rule": rule, "attack": attack, "seed": seed, **res})
        print(f"seed {seed} {attack:<13} {rule:<13} honest mean {res['honest_mean']:.4f} "
              f"({res['wall_s']:.0f} s)", file=sys.stderr)  # fmt: skip
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
