"""What every message costs a Flower ClientApp before its work. Flower 1.42's SuperNode starts a
fresh ClientApp process for each message (a client's training, evaluation or query), and that
process imports the app and sets the client up (``fedlease.flower.client_app.node_for``: the
frozen model, the client's tokenised data, its strategy) before it trains or evaluates anything.
Each repetition runs in a fresh process, as the SuperNode's would; the table gives the medians of:

  import      importing fedlease.flower.client_app (torch, transformers, flwr, fedlease)
  set-up      node_for on client 0 of the run config CONFIG (model, data, strategy)
  model again the same model loaded a second time in that process: what set-up's model load
              costs without the one-time imports it triggers

    python benchmarks/clientapp_start.py --data-dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

CONFIG = {"clients": ["sst2", "mrpc", "sst2", "mrpc"], "precision": "fp32", "train_samples": 16,
          "test_samples": 16, "max_seq_len": 32, "threads": 1, "seed": 5}  # fmt: skip
PHASES = ("import", "set-up", "model again")
CHILD = "--time-one-start"  # the argument of the processes that measure


def start_once(data_dir: str, model: str) -> dict[str, float]:
    """One ClientApp start in this (fresh) process, phase by phase, in seconds."""
    t0 = time.perf_counter()
    from flwr.app import Context, RecordDict

    from fedlease.fl.config import runtime
    from fedlease.fl.pool import load_base
    from fedlease.flower import client_app

    t1 = time.perf_counter()
    run_config = {k.replace("_", "-"): json.dumps(v) if isinstance(v, list) else v
                  for k, v in {**CONFIG, "model": model}.items()}  # fmt: skip
    context = Context(run_id=0, node_id=0, node_config={"partition-id": 0, "data-dir": data_dir},
                      state=RecordDict(), run_config=run_config)  # fmt: skip
    node = client_app.node_for(context)
    t2 = time.perf_counter()
    load_base(node.cfg, runtime(node.cfg))
    t3 = time.perf_counter()
    return {"import": t1 - t0, "set-up": t2 - t1, "model again": t3 - t2}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD]:  # one timed start: nothing imported before it, so no argparse here
        print(json.dumps(start_once(*argv[1:])))
        return
    from timing import cpu_name, versions

    from fedlease.cli_args import at_least, check_config, child_result, exit_on_user_error
    from fedlease.fl.config import from_dict
    from fedlease.models import model_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, help="local GLUE copy (<dir>/<task>/*.jsonl)")
    p.add_argument("--model", default="minilm", help="the run's model (bundled name or path)")
    p.add_argument("--repeats", type=at_least(1), default=3, help="fresh processes timed")
    p.add_argument("--json", action="store_true", help="print one JSON object, not a table")
    args = p.parse_args(argv)
    with exit_on_user_error("clientapp_start.py"):
        check_config(from_dict({**CONFIG, "model": args.model, "data_dir": args.data_dir}))
        model_path(args.model)
    child = [sys.executable, __file__, CHILD, args.data_dir, args.model]
    runs = [child_result(child, "a ClientApp start") for _ in range(args.repeats)]
    medians = {phase: statistics.median(r[phase] for r in runs) for phase in PHASES}
    if args.json:
        print(json.dumps({"device": cpu_name(), "versions": versions(), "model": args.model,
                          "repeats": args.repeats, "median_s": medians, "runs": runs}))  # fmt: skip
        return
    print(f"{cpu_name()}, model {args.model}, medians of {args.repeats} fresh processes")
    for phase in PHASES:
        each = ", ".join(f"{r[phase]:.2f}" for r in runs)
        print(f"{phase:<12} {medians[phase]:6.2f} s   ({each})")
    print(f"{'start':<12} {medians['import'] + medians['set-up']:6.2f} s   (import + set-up)")


if __name__ == "__main__":
    main()
