"""How far each aggregation rule lands from the honest clients' mean when one of four uploads is
tampered with: measured on real uploads, no attacked training needed.

A clean run of ``robustness.py``'s setting (four clients on one task sharing one LoRA, FedIT)
records, every round, the global state sent down and the four uploads. For each round, attack
and rule, client 3's upload is replaced by its tampered form (``start + factor * u`` for scale,
``start - factor * u`` for sign flips, ``u`` its honest update) and the rule combines the four.
With ``h`` the mean update of the three honest clients and ``a`` the rule's update:

* ``step``: ``<a, h> / |h|^2``, the part of the honest step the rule keeps (1 for the honest mean);
* ``error``: ``|a - h| / |h|``, the distance to the honest mean (0 for Multi-Krum that drops the
  attacker);
* ``pull``: ``<a - h, v> / (|v| |h|)`` with ``v`` the attacker's honest update: how far the
  error points along what the attacker actually learned (positive: towards it, as if its data
  weighed more; negative: away from it, unlearning it).

Under ``none`` (no attack) ``h`` is the mean of all four updates: the rule's own deviation from
the mean, which the clean runs of ``robustness.md`` show costs no accuracy.

A rule whose ``step`` stays near 1 and ``error`` near 0 behaves like training on the honest
clients alone; a rule that keeps half the step trains at half the learning rate.

    python studies/robust_bias.py --data-dir ../shared/data/glue --seeds 1,2 \\
        --json runs/robust_bias.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from robustness import ATTACKS, add_setting_arguments, check_settings, setting

from fedlease.cli_args import exit_on_user_error, output_file

RULES = {
    "mean": "mean",
    "median": "median",
    "trimmed_mean": {"rule": "trimmed_mean", "trim": 0.25},
    "norm_clip": "norm_clip",
    "norm_clip, clip 0.5": {"rule": "norm_clip", "clip": 0.5},
    "norm_clip, clip 0.25": {"rule": "norm_clip", "clip": 0.25},
    "krum": "krum",
}

Flat = torch.Tensor


def flatten(state: dict[str, torch.Tensor], keys: list[str]) -> Flat:
    return torch.cat([state[k].double().reshape(-1) for k in keys])


def tampered(update: Flat, attack: dict, client: int) -> Flat:
    """The update ``client`` sends instead of ``update`` under ``attack`` (``attacks:``'s own
    tampering, applied from a zero start)."""
    from fedlease.fl.faults import AttackPlan

    plan = AttackPlan(clients=(client,), **attack)
    return plan.tamper({"u": torch.zeros_like(update)}, {"u": update}, 0, client)["u"]


def step_error_pull(aggregate: Flat, honest: Flat, attacker: Flat) -> tuple[float, float, float]:
    """``<a, h> / |h|^2``, ``|a - h| / |h|`` and ``<a - h, v> / (|v| |h|)``."""
    hh = float(honest @ honest)
    off = aggregate - honest
    pull = float(off @ attacker) / (float(attacker.norm()) * math.sqrt(hh))
    return float(aggregate @ honest) / hh, float(off.norm()) / math.sqrt(hh), pull


def measure_round(updates: list[Flat], weights: list[float], rules: dict, attacker: int = 3
                  ) -> dict:  # fmt: skip
    """Per attack and rule, ``step``, ``error`` and ``pull`` of the rule applied to ``updates``
    with the attacker's replaced; plus the honest uploads' spread around their mean (relative to
    it)."""
    from fedlease.fl.allocation import average
    from fedlease.fl.robust import Aggregation

    def mean_of(ids):
        return average([updates[i] for i in ids], [weights[i] for i in ids])

    honest_ids = [i for i in range(len(updates)) if i != attacker]
    h = mean_of(honest_ids)
    spread = [float((updates[i] - h).norm() / h.norm()) for i in honest_ids]
    out = {"spread": sum(spread) / len(spread), "cells": {}}
    for attack, how in ATTACKS.items():
        ups, ref = list(updates), h
        if how is None:
            ref = mean_of(range(len(updates)))
        else:
            ups[attacker] = tampered(updates[attacker], how, attacker)
        for name, cfg in rules.items():
            agg = Aggregation.from_config(cfg)([{"u": u} for u in ups], weights)["u"]
            out["cells"][f"{attack}|{name}"] = step_error_pull(agg, ref, updates[attacker])
    return out


def record_clean_run(args, seed: int) -> list[dict]:
    """The clean run; per round the start state and the four uploads as flat vectors."""
    from fedlease.fl import from_dict
    from fedlease.fl.simulator import simulation

    run = simulation(from_dict(setting(args, seed, "fedit")), progress=False)
    strategy, rounds = run.strategy, []
    inner = strategy.aggregate

    def recording_aggregate(r, ups):
        keys = sorted(strategy.global_)
        start = flatten(strategy.global_, keys)
        ids = sorted(ups)
        rounds.append({"round": r, "weights": [strategy.weights[i] for i in ids],
                       "updates": [flatten(ups[i], keys) - start for i in ids]})  # fmt: skip
        inner(r, ups)

    strategy.aggregate = recording_aggregate
    run.run()
    return rounds


def measured_rounds(args) -> list[dict]:
    """Every round of each seed's clean run in which all four clients uploaded, measured."""
    rows = []
    for seed in args.seeds:
        for rec in record_clean_run(args, seed):
            if len(rec["updates"]) != 4:
                continue
            m = measure_round(rec["updates"], rec["weights"], RULES)
            rows.append({"seed": seed, "round": rec["round"], **m})
            print(f"seed {seed} round {rec['round']}: honest spread {m['spread']:.2f}",
                  file=sys.stderr)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_setting_arguments(p)
    p.add_argument("--json", type=output_file, help="write every round's numbers here")
    args = p.parse_args(argv)
    with exit_on_user_error("robust_bias.py"):
        check_settings(args, "fedit")
        rows = measured_rounds(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    """Mean ``step`` / ``error`` / ``pull`` over every recorded round, one row per rule."""
    cells = rows[0]["cells"]
    rules = list(dict.fromkeys(c.split("|")[1] for c in cells))
    spread = sum(r["spread"] for r in rows) / len(rows)
    lines = [f"step kept / error / pull, mean over {len(rows)} rounds (honest spread "
             f"{spread:.2f})", "",
             "| aggregation | " + " | ".join(ATTACKS) + " |",
             "|---" * (len(ATTACKS) + 1) + "|"]  # fmt: skip
    for rule in rules:
        vals = []
        for attack in ATTACKS:
            s = [r["cells"][f"{attack}|{rule}"] for r in rows]
            step, error, pull = (sum(x[i] for x in s) / len(s) for i in (0, 1, 2))
            vals.append(f"{step:.2f} / {error:.2f} / {pull:+.2f}")
        lines.append(f"| {rule} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
