"""FedLEASE's warm-up when only some clients train per round: three behaviours, measured.

The allocation clusters the clients by their warm-up B matrices, so every client needs one; under
``clients_per_round`` sampling there are three ways to get them:

* ``all``: every client trains in each of the ``warmup_rounds`` (sampling starts with the adaptive
  rounds), the allocation clusters all N. This is what the simulator and the Flower apps do.
* ``wait``: the warm-up rounds sample like every other round and the allocation waits until every
  client has been drawn at least once (the number of rounds that takes is measured).
* ``nearest``: ``warmup_rounds`` sampled rounds; the allocation clusters the clients seen so far;
  a client first drawn in an adaptive round trains one warm-up round then and joins the cluster
  at the least average distance from its B (average linkage, as the clustering itself); a client
  never drawn stays unplaced.

Every behaviour uses the library's own pieces, as a run does: the same partitions, the warm-up
training spec, the per-(seed, round, client) training seeds, the draws of ``participants`` and the
server's ``b_distance_matrix`` / ``allocate``. Reported per seed and participation: client
trainings the warm-up cost, the round the allocation happens before, the number of clients never
placed within ``rounds`` adaptive rounds, K, and the adjusted Rand index of the placed clients'
experts against their tasks.

    python studies/warmup_sampling.py --data-dir ../shared/data/glue --seed 1 \\
        --fractions 0.25,0.5 --json runs/warmup_sampling_seed1.json
    python studies/warmup_sampling.py --table runs/warmup_sampling_seed*.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from fedlease import cli_args
from fedlease.cli_args import at_least, float_list, name_list, output_file

MIX = ["sst2"] * 4 + ["mrpc"] * 4 + ["qnli"] * 4


def build(args, fraction: float):
    from fedlease.fl import from_dict

    return from_dict({
        "clients": list(args.clients), "train_samples": args.train_samples, "test_samples": 8,
        "warmup_rounds": args.warmup_rounds, "rounds": args.rounds, "local_epochs": 1,
        "batch_size": 16, "max_seq_len": args.max_seq_len, "rank": 4, "alpha": 16,
        "max_experts": args.max_experts, "clients_per_round": fraction, "seed": args.seed,
        "threads": args.threads, "data_dir": args.data_dir,
    })  # fmt: skip


class Warmups:
    """Client warm-up adapters trained through a given sequence of rounds, each sequence once
    (prefixes shared), as the simulator trains them: from the same initial adapter, the warm-up
    spec, seed ``seed_for(run seed, round, client)`` per round."""

    def __init__(self, cfg):
        from fedlease.data.sources import build_client_data, source_for
        from fedlease.fl.config import runtime
        from fedlease.fl.pool import ModelPool, load_base
        from fedlease.fl.strategies import Layout, make_strategy

        rt = runtime(cfg)
        base, tokenizer = load_base(cfg, rt)
        data_dir = source_for(cfg.task_type).resolve(cfg.data_dir)
        self.clients = build_client_data(cfg.clients, tokenizer, cfg.train_samples,
                                         cfg.test_samples, cfg.max_seq_len, cfg.seed,
                                         cfg.label_alpha, data_dir)  # fmt: skip
        pool = ModelPool(cfg, base, tokenizer, progress=False, rt=rt)
        self.runner = pool.runner(Layout())
        self.template = pool.template(Layout())
        self.spec = make_strategy(cfg, [1.0] * len(cfg.clients)).training(0)
        self.seed = cfg.seed
        self.memo: dict[tuple, dict] = {}
        self.seconds = []

    def state(self, cid: int, rounds: tuple[int, ...]) -> dict:
        from fedlease.fl.client import seed_for

        if not rounds:
            return self.template
        key = (cid, rounds)
        if key not in self.memo:
            start = self.state(cid, rounds[:-1])
            t0 = time.time()
            seed = seed_for(self.seed, rounds[-1], cid)
            new, _ = self.runner.train(self.clients[cid], start, seed, training=self.spec)
            self.seconds.append(time.time() - t0)
            self.memo[key] = new
        return self.memo[key]


def ari(tasks: list[str], placed: dict[int, int]) -> float:
    from sklearn.metrics import adjusted_rand_score

    ids = sorted(placed)
    return float(adjusted_rand_score([tasks[i] for i in ids], [placed[i] for i in ids]))


def cluster_all(warm: Warmups, rounds_of: dict[int, tuple], cfg) -> dict:
    from fedlease.fl.allocation import allocate, b_distance_matrix

    ids = sorted(rounds_of)
    d = b_distance_matrix([warm.state(i, rounds_of[i]) for i in ids])
    alloc = allocate(d, cfg.max_experts)
    return {"k": alloc.num_experts, "placed": dict(zip(ids, alloc.assignment)),
            "silhouette": alloc.silhouette}  # fmt: skip


def behaviour_all(warm, cfg) -> dict:
    w = cfg.warmup_rounds
    out = cluster_all(warm, {i: tuple(range(w)) for i in range(len(cfg.clients))}, cfg)
    return out | {"trainings": w * len(cfg.clients), "allocated_before_round": w}


def add_draws(cfg, r: int, rounds_of: dict[int, tuple]) -> None:
    """Append round ``r`` to the warm-up rounds of each client ``participants`` draws in it."""
    from fedlease.fl.participation import participants

    for cid in participants(cfg, r):
        rounds_of[cid] = rounds_of.get(cid, ()) + (r,)


def behaviour_wait(warm, cfg) -> dict:
    n, rounds_of, r = len(cfg.clients), {}, 0
    while len(rounds_of) < n or r < cfg.warmup_rounds:
        add_draws(cfg, r, rounds_of)
        r += 1
    out = cluster_all(warm, rounds_of, cfg)
    return out | {"trainings": sum(len(v) for v in rounds_of.values()), "allocated_before_round": r}


def behaviour_nearest(warm, cfg) -> dict:
    from fedlease.fl.allocation import b_distance_matrix
    from fedlease.fl.participation import participants

    rounds_of: dict[int, tuple] = {}
    for r in range(cfg.warmup_rounds):
        add_draws(cfg, r, rounds_of)
    if len(rounds_of) < 3:
        return {"error": f"only {len(rounds_of)} clients seen in the warm-up"}
    out = cluster_all(warm, rounds_of, cfg)
    placed, k = dict(out["placed"]), out["k"]
    seen = sorted(rounds_of)
    late = []
    for r in range(cfg.warmup_rounds, cfg.warmup_rounds + cfg.rounds):
        for cid in participants(cfg, r):
            if cid in placed:
                continue
            states = [warm.state(i, rounds_of[i]) for i in seen] + [warm.state(cid, (r,))]
            dist = b_distance_matrix(states)[-1, :-1]
            mean = [np.mean([dist[j] for j, i in enumerate(seen) if out["placed"][i] == e])
                    for e in range(k)]  # fmt: skip
            placed[cid] = int(np.argmin(mean))
            late.append({"client": cid, "round": r, "expert": placed[cid]})
    trainings = sum(len(v) for v in rounds_of.values()) + len(late)
    return out | {"placed": placed, "late": late, "trainings": trainings,
                  "allocated_before_round": cfg.warmup_rounds}  # fmt: skip


def table(paths: list[str]) -> str:
    """One markdown row per (participation, behaviour, seed) of the given JSON files."""
    rows = []
    for p in paths:
        doc = cli_args.read_json(p)
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
            raise cli_args.BadInput(f"{p!r} is not a --json file of this study (no 'rows')")
        rows += doc["rows"]
    order = {"all": 0, "wait": 1, "nearest": 2}
    rows.sort(key=lambda r: (r["fraction"], order[r["behaviour"]], r["seed"]))
    out = [
        "| per round | behaviour | seed | warm-up trainings | allocation before round | K | "
        "silhouette at K | placed late | never placed | ARI (placed) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['fraction']:g} | {r['behaviour']} | {r['seed']} | {r['trainings']} | "
            f"{r['allocated_before_round']} | {r['k']} | {r['silhouette'][str(r['k'])]:.2f} | "
            f"{len(r.get('late', []))} | "
            f"{r['unplaced']} | {r['ari']:.2f} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="local GLUE copy (else $FEDLEASE_DATA_DIR)")
    p.add_argument("--seed", type=at_least(0), default=1,
                   help="run seed (partitions, draws, training)")  # fmt: skip
    p.add_argument("--fractions", type=float_list, default=[0.25, 0.5],
                   help="clients_per_round values to measure (default: 0.25,0.5)")  # fmt: skip
    p.add_argument("--clients", type=name_list(None), default=list(MIX),
                   help="task per client, comma-separated")  # fmt: skip
    p.add_argument("--train-samples", type=at_least(1), default=600,
                   help="training examples per client")  # fmt: skip
    p.add_argument("--max-seq-len", type=at_least(1), default=64, help="tokens per example")
    p.add_argument("--warmup-rounds", type=at_least(1), default=2,
                   help="warm-up rounds (all, nearest)")  # fmt: skip
    p.add_argument("--rounds", type=at_least(1), default=4,
                   help="adaptive rounds (nearest: late placement)")  # fmt: skip
    p.add_argument("--max-experts", type=at_least(2), default=4,
                   help="largest K the silhouette considers")  # fmt: skip
    p.add_argument("--threads", type=at_least(1), default=1, help="torch threads")
    p.add_argument("--json", type=output_file, default=None, help="write the rows here")
    p.add_argument("--table", nargs="+", default=None, help="print the table of these JSON files")
    args = p.parse_args(argv)
    with cli_args.exit_on_user_error("warmup_sampling.py"):
        if args.table:
            print(table(args.table))
            return 0
        fractions = args.fractions
        for f in fractions:  # every config, before the first training
            cli_args.check_config(build(args, f))
    t0 = time.time()
    warm = Warmups(build(args, fractions[0]))
    rows = []
    for f in fractions:
        cfg = build(args, f)
        for name, fn in (("all", behaviour_all), ("wait", behaviour_wait),
                         ("nearest", behaviour_nearest)):  # fmt: skip
            res = fn(warm, cfg)
            if "placed" in res:
                res["ari"] = ari(cfg.clients, res["placed"])
                res["unplaced"] = len(cfg.clients) - len(res["placed"])
                res["placed"] = {str(k): v for k, v in sorted(res["placed"].items())}
            row = {"seed": args.seed, "fraction": f, "behaviour": name, **res}
            rows.append(row)
            print(json.dumps(row), flush=True)
    seconds = float(np.mean(warm.seconds))
    meta = {"argv": sys.argv, "wall_s": round(time.time() - t0, 1),
            "seconds_per_training": round(seconds, 2),
            "trainings_run": len(warm.seconds)}  # fmt: skip
    print(json.dumps(meta))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
