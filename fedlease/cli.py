"""The ``fedlease`` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlease",
        description="Federated fine-tuning with mixtures of LoRA experts (FedLEASE).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "demo",
        help="inject MoE-LoRA into the bundled MiniLM, take one step, print what it computed",
        description="Inject MoE-LoRA into the bundled MiniLM, take one training step and print "
        "the routing and loss it computed.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import print_layer_demo

        print_layer_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
