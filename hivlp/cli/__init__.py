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
from hivlp.redact import install_log_redaction, redact


class BrokenCommandError(HivlpError):
    """A sub-command module failed to import."""

# Order is the order of the help text: the stages of the pipeline.
COMMANDS = [
    "validate",
    "pretrain",
    "finetune",
    "evaluate",
    "export",
    "index",
    "search",
    "serve",
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
        except Exception as e:  # a command that cannot load is a broken install: say so, never hide it
            raise BrokenCommandError(
                f"hivlp: the '{name}' command cannot be loaded ({type(e).__name__}: {e}); the installation "
                "is broken or incomplete: re-run `make setup` (or reinstall hivlp)"
            ) from e
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except BrokenCommandError as e:
        print(e, file=sys.stderr)
        return e.exit_code
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_log_redaction()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HivlpError as e:
        print(redact(f"hivlp {args.command}: error: {e}"), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"hivlp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
