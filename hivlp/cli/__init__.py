"""The `hivlp` command line: one sub-command per pipeline stage, each a thin face over the library.

Sub-command modules register their parser in `register(subparsers)` and import heavy libraries
(torch, mlflow, pymilvus, great_expectations, kfp) only inside their run function.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from hivlp import __version__
from hivlp.errors import HivlpError

# Order is the order of the help text: the stages of the pipeline.
COMMANDS = [
    "validate",
    "pretrain",
    "finetune",
    "evaluate",
    "export",
    "index",
    "search",
    "bench",
    "promote",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hivlp",
        description="Hierarchical vision-language embeddings for fast image-text retrieval.",
    )
    parser.add_argument("--version", action="version", version=f"hivlp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hivlp.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"hivlp.cli.{name}":
                raise
            continue  # command not built yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HivlpError as e:
        print(f"hivlp {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"hivlp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
