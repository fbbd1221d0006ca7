"""The ``fedlease`` command line: ``run`` (the main job), ``compare`` (methods side by side),
``eval`` (a saved adapter on a task) and ``demo`` (a layer tour)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .cli_args import int_list

EXIT_BAD_INPUT = 2


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it says something (not None/False/[], not twice)."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in action.help:
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        if text.startswith("config keys"):  # a list, one key per line: keep its lines
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


class _Version(argparse.Action):
    """``--version``: its report needs torch and a bf16 measurement, so it is made when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .version import version_text

        print(version_text())
        parser.exit()


def _methods() -> tuple[str, ...]:
    from .fl.config import METHODS

    return METHODS


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="local GLUE copy laid out as DIR/<task>/{train,validation}.jsonl; "
        "overrides the config's data_dir and $FEDLEASE_DATA_DIR; without any of "
        "them data comes from the Hugging Face hub (nyu-mll/glue)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key with a YAML value, e.g. --set rounds=3 "
        "--set clients=[sst2,qnli,qnli]; repeatable",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bars (the final table is still printed)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlease",
        description="Federated fine-tuning with mixtures of LoRA experts (FedLEASE).",
    )
    parser.add_argument(
        "--version",
        action=_Version,
        help="print the version and what it runs on (Python, torch, triton; per device the "
        "MoE-LoRA backends that can run, and the backend and precision `auto` picks), then exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_run(sub)
    _add_compare(sub)
    _add_eval(sub)
    _add_export(sub)
    sub.add_parser(
        "demo",
        help="inject MoE-LoRA into the bundled MiniLM, take one step, print what it computed",
        description="Inject MoE-LoRA into the bundled MiniLM, take one training step and print "
        "the routing and loss it computed.",
    )
    return parser


def _add_run(sub) -> None:
    from .fl.config import keys_help

    run = sub.add_parser(
        "run",
        help="run FedLEASE end to end (warm-up, allocation, adaptive rounds) from a YAML config",
        description="Run FedLEASE in one process: every client warms up a LoRA adapter, the "
        "server clusters clients by their LoRA B matrices into experts, then clients train "
        "their own expert and router with adaptive top-M routing. The config key `method` "
        "picks an ablation or a baseline instead (see `fedlease compare --help`). Writes "
        "config.yaml, metrics.jsonl, clusters.json, summary.json, plots and every client's "
        "final adapter (adapters/client<i>/) to the output directory, with a checkpoint after "
        "every round.",
        epilog=keys_help(),
        formatter_class=_Help,
    )
    run.add_argument(
        "--config",
        metavar="YAML",
        help="run configuration (see configs/demo.yaml and configs/glue4.yaml); "
        "required unless --resume is given",
    )
    run.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue the run in DIR from its last complete round (runs checkpoint after "
        "every round); uses DIR/config.yaml, and writes to DIR",
    )
    run.add_argument(
        "--output",
        metavar="DIR",
        default=None,
        help="directory for the artefacts (default: runs/<config name>-<time>); it must be new "
        "or empty unless --overwrite is given",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --output that is not empty: the files an earlier fedlease run wrote "
        "there (listed in its fedlease-run.json) are replaced, every other file is kept, and a "
        "file the run would write that no run wrote stops it",
    )
    _add_common(run)


def _add_compare(sub) -> None:
    cmp = sub.add_parser(
        "compare",
        help="run several methods (FedLEASE, ablations, baselines) on the same data and seeds",
        description="Run every method in --methods for every seed in --seeds on identical client "
        "partitions (same config otherwise) and write compare.json, compare.md (one row per "
        "method, one column per task, average, communication per round) and compare.png to the "
        "output directory; each run's own artefacts go to DIR/<method>-seed<seed>/. Re-running "
        "the same command reuses finished runs and resumes interrupted ones.",
        formatter_class=_Help,
    )
    cmp.add_argument("--config", metavar="YAML", required=True, help="base run configuration")
    cmp.add_argument(
        "--methods",
        required=True,
        metavar="M1,M2,...",
        help="comma-separated methods; known: " + ", ".join(_methods()),
    )
    cmp.add_argument(
        "--seeds",
        default=None,
        metavar="S1,S2,...",
        help="comma-separated integer seeds (each seed draws its own partition, shared by all "
        "methods); default: the config's seed",
    )
    cmp.add_argument(
        "--output",
        metavar="DIR",
        default=None,
        help="directory for the comparison (default: runs/compare-<config name>-<time>)",
    )
    _add_common(cmp)


def _add_eval(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="evaluate a saved adapter (e.g. runs/NAME/adapters/client0) on a GLUE or FLAN task",
        description="Load the base model an adapter names, inject its MoE-LoRA layers, load its "
        "weights (names, shapes and dtypes must match exactly) and report accuracy (F1 too for "
        "MRPC/QQP) on the task's validation split; an adapter of a generation run decodes "
        "greedily on the FLAN task's test split and reports ROUGE-1/2/L. Every finished "
        "`fedlease run` writes one adapter per client to <run>/adapters/client<i>/.",
        formatter_class=_Help,
    )
    ev.add_argument(
        "--adapter",
        required=True,
        metavar="DIR",
        help="directory holding adapter_model.safetensors and adapter_config.json",
    )
    ev.add_argument(
        "--task",
        default=None,
        help="GLUE or FLAN task to evaluate on (default: the adapter's own task)",
    )
    ev.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="generation adapters: tokens to generate per example (default: the run's)",
    )
    ev.add_argument(
        "--samples",
        type=int,
        default=None,
        metavar="N",
        help="evaluate on the first N validation examples only (default: all)",
    )
    ev.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="local GLUE copy (DIR/<task>/validation.jsonl); default $FEDLEASE_DATA_DIR, else "
        "the Hugging Face hub. Generation adapters: the FLAN copy (DIR/<task>/test.jsonl); "
        "default $FEDLEASE_FLAN_DIR",
    )


def _add_export(sub) -> None:
    ex = sub.add_parser(
        "export",
        help="write one expert of a saved adapter as a standard PEFT LoRA adapter",
        description="Load a saved adapter (e.g. runs/NAME/adapters/client0) on the base model it "
        "names and write expert K, with the adapter's task head, as a PEFT LoRA adapter "
        "(adapter_config.json + adapter_model.safetensors) that "
        "peft.PeftModel.from_pretrained(base, OUT) loads with no fedlease code, computing exactly "
        "that expert's output. Nothing is written when the input is bad (exit code 2).",
        formatter_class=_Help,
    )
    ex.add_argument(
        "--adapter",
        required=True,
        metavar="DIR",
        help="saved fedlease adapter (adapter_model.safetensors + adapter_config.json)",
    )
    ex.add_argument(
        "--expert",
        required=True,
        type=int,
        metavar="K",
        help="which expert to export (0..M-1; a client's own expert is `own_expert` in its "
        "adapter_config.json)",
    )
    ex.add_argument("--out", required=True, metavar="DIR",
                    help="directory for the PEFT adapter (README.md, adapter_config.json, "
                    "adapter_model.safetensors); it must not hold files of those names already, "
                    "other files in it are left alone")  # fmt: skip


def _load(args: argparse.Namespace, config_path: str, check_device: bool = True):
    """The validated config with the command line's overrides; raises ConfigError/DataError.
    ``check_device``: also fail now when this machine lacks the config's device."""
    from .cli_args import check_config
    from .fl import load_config

    cfg = load_config(config_path, args.overrides)
    if args.data_dir is not None:
        cfg.data_dir = args.data_dir
    return check_config(cfg, device=check_device)


def _cmd_run(args: argparse.Namespace) -> int:
    from .errors import user_errors
    from .fl import run

    if args.resume is None and args.config is None:
        print("fedlease run: error: give --config YAML (or --resume DIR)", file=sys.stderr)
        return EXIT_BAD_INPUT
    config_path = args.config or str(Path(args.resume) / "config.yaml")
    try:
        cfg = _load(args, config_path)
    except user_errors() as exc:
        print(f"fedlease run: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.resume is not None:
        out = Path(args.resume)
    elif args.output:
        out = Path(args.output)
    else:
        out = Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    why = _output_problem(out, args)
    if why:
        print(f"fedlease run: error: {why}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        summary = run(cfg, out, progress=not args.no_progress, resume=args.resume is not None,
                      overwrite=args.overwrite)  # fmt: skip
    except KeyboardInterrupt:
        print(f"\ninterrupted: completed rounds are saved; continue with "
              f"`fedlease run --resume {out}`", file=sys.stderr)  # fmt: skip
        return 130
    except user_errors() as exc:
        print(f"fedlease run: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print_summary(summary, out)
    return 0


def _output_problem(out: Path, args: argparse.Namespace) -> str | None:
    """Why ``out`` cannot take the run (None: it can): not a directory, not writable, a
    ``--output`` beside ``--resume`` that names another directory, or (a fresh run) not empty
    without ``--overwrite`` or holding a file in the run's way (``fedlease.fl.rundir``)."""
    from .fl import rundir

    if args.resume is not None and args.output and Path(args.output).resolve() != out.resolve():
        return (f"--output {args.output!r} with --resume {args.resume!r}: a resumed run writes to "
                "its own directory; leave --output out")  # fmt: skip
    if args.resume is not None and args.overwrite:
        return "--overwrite with --resume: a resumed run continues its directory; leave one out"
    if out.exists() and not out.is_dir():
        return f"output {str(out)!r} is a file, not a directory"
    if args.resume is None and (why := rundir.problem(out, args.overwrite)):
        return why
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return (
            f"output {str(out)!r} cannot be written ({str(existing)!r} is not a writable directory)"
        )
    return None


def _seeds(text: str) -> list[int]:
    """``--seeds``, parsed as every comma-separated integer flag is (``cli_args.int_list``)."""
    from .fl import ConfigError

    try:
        return int_list(0)(text)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"--seeds: {e}") from None


def _cmd_compare(args: argparse.Namespace) -> int:
    from .errors import user_errors
    from .fl.compare import compare

    out = None
    try:
        cfg = _load(args, args.config, check_device=False)  # compare checks it if it must run
        seeds = _seeds(args.seeds) if args.seeds else [cfg.seed]
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        out = Path(args.output or Path("runs") / f"compare-{Path(args.config).stem}-"
                   f"{time.strftime('%Y%m%d-%H%M%S')}")  # fmt: skip
        compare(cfg, methods, seeds, out, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished and checkpointed rounds are saved; run the same command "
              f"with --output {out} to continue", file=sys.stderr)  # fmt: skip
        return 130
    except user_errors() as exc:
        print(f"fedlease compare: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print()
    print((out / "compare.md").read_text())
    print(f"artefacts in {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .errors import user_errors
    from .evaluate import evaluate_adapter

    for flag, value in (("--samples", args.samples), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            print(f"fedlease eval: error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        result = evaluate_adapter(args.adapter, args.task, args.samples, args.data_dir,
                                  max_new_tokens=args.max_new_tokens)  # fmt: skip
    except user_errors() as exc:
        print(f"fedlease eval: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if "rouge1" in result:
        scores = "  ".join(f"{k} {result[k]:.4f}" for k in ("rouge1", "rouge2", "rougeL"))
    else:
        scores = f"accuracy {result['accuracy']:.4f}"
        scores += f"  f1 {result['f1']:.4f}" if "f1" in result else ""
    print(f"{result['task']}: {scores}  loss {result['eval_loss']:.4f}  "
          f"({result['examples']} examples)")  # fmt: skip
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .errors import user_errors
    from .peft_io import export_saved_expert

    try:
        out = export_saved_expert(args.adapter, args.expert, args.out)
    except user_errors() as exc:
        print(f"fedlease export: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"expert {args.expert} of {args.adapter} written as a PEFT LoRA adapter to {out}")
    return 0


def print_summary(summary, out: Path) -> None:
    final = summary.final
    metric = final.get("metric", "accuracy")
    second = "f1" if metric == "accuracy" else "rougeL"  # F1 of MRPC/QQP; ROUGE-L of answers
    print(f"\n{summary.method}: {summary.num_experts} experts, assignment {summary.assignment}")
    w = max([6, *(len(c["task"]) for c in final["per_client"])])  # FLAN task names are long
    print(f"{'client':>6}  {'task':<{w}} {'expert':>6} {metric:>9} {second:>7}")
    for c in final["per_client"]:
        extra = f"{c[second]:.4f}" if second in c else "-"
        expert = summary.assignment[c["client"]]
        print(f"{c['client']:>6}  {c['task']:<{w}} {expert:>6} {c[metric]:>9.4f} {extra:>7}")
    tasks = "  ".join(f"{t} {a:.4f}" for t, a in final["per_task"].items())
    print(f"per task: {tasks}")
    comm = summary.comm_bytes
    print(
        f"mean {metric} {summary.mean_text()} (untrained {summary.initial_mean:.4f})   "
        f"communication up {comm['up'] / 1e6:.1f} MB, down {comm['down'] / 1e6:.1f} MB   "
        f"wall {summary.wall_s:.0f} s"
    )
    print(f"artefacts in {out}")


COMMANDS = {"run": _cmd_run, "compare": _cmd_compare, "eval": _cmd_eval, "export": _cmd_export}
EXIT_INTERNAL = 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import print_layer_demo

            print_layer_demo()
            return 0
        return COMMANDS[args.command](args)
    except Exception as exc:  # bad input never gets here: each command names it, exit code 2
        return _internal_error(args.command, exc)


def _internal_error(command: str, exc: Exception) -> int:
    """A failure that is not the user's input: one line naming it and the file holding the full
    traceback (in the temporary directory), exit code 1."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix=f"fedlease-{command}-error-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("".join(traceback.format_exception(exc)))
    first = (str(exc).splitlines() or [""])[0][:300]
    print(f"fedlease {command}: internal error: {type(exc).__name__}: {first} (full traceback "
          f"in {path})", file=sys.stderr)  # fmt: skip
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
