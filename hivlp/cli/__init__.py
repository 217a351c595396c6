"""The `hivlp` command line: one sub-command per pipeline stage, each a thin face over the library.

Sub-command modules register their parser in `register(subparsers)` and import heavy libraries
(torch, mlflow, pymilvus, great_expectations, kfp) only inside their run function.

Errors: whatever the input, a user sees one line naming the culprit, never a traceback. A
`HivlpError` is printed as `hivlp <command>: error: <message>` and exits with its code (2 for bad
arguments, config, dataset or checkpoint; 1 for problems found or a failed runtime dependency); any
other exception is an internal error (exit 1) with the same single line. `hivlp --debug <command>` (or
HIVLP_DEBUG=1) adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback

from hivlp import __version__
from hivlp.errors import HivlpError
from hivlp.redact import install_log_redaction, redact, redacted_streams


class BrokenCommandError(HivlpError):
    """A sub-command module failed to import."""

# Order is the order of the help text: the stages of the pipeline.
COMMANDS = [
    "validate",
    "pretrain",
    "finetune",
    "evaluate",
    "report",
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
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error (also HIVLP_DEBUG=1)")
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


# torch's DataLoader re-raises a worker's exception as the same type with the worker's traceback as
# its message: "Caught X in DataLoader worker process 0.\nOriginal Traceback ...\nmodule.X: message".
_WORKER_TRACEBACK = re.compile(r"^Caught \w+ in .*?\nOriginal Traceback \(most recent call last\):\n", re.S)


def error_line(e: BaseException) -> str:
    """The one line a user sees for an exception: its message, without a traceback in it."""
    text = str(e)
    if _WORKER_TRACEBACK.match(text):
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and not last.startswith(" ") else last
    return " ".join(text.split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; stdout and stderr mask credentials in URIs while it runs (`hivlp.redact`)."""
    with redacted_streams():
        return _main(argv)


def _main(argv: list[str] | None = None) -> int:
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
    debug = args.debug or os.environ.get("HIVLP_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except HivlpError as e:
        if debug:
            traceback.print_exc()
        print(redact(f"hivlp {args.command}: error: {error_line(e)}"), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"hivlp {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an input no check foresaw, or a bug: one line, the traceback on request
        if debug:
            traceback.print_exc()
        print(redact(
            f"hivlp {args.command}: internal error: {type(e).__name__}: {error_line(e)} "
            f"({'traceback above' if debug else 're-run with hivlp --debug for the traceback'}; please report it)"
        ), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
