"""`hivlp validate`: check a Karpathy-format dataset before training on it.

Exit codes: 0 clean (warnings allowed), 1 problems found, 2 usage error or unreadable input.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

# Light imports only: pandas and great-expectations load inside validate_dataset.
from hivlp.data.validate import (
    DEFAULT_SPLITS,
    ValidationLimits,
    format_summary,
    validate_dataset,
)
from hivlp.io import atomic_write_json, check_output_dir, check_output_file

DEFAULT_REPORT_DIR = Path("outputs/validation")


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = ValidationLimits()
    p = subparsers.add_parser(
        "validate",
        help="check a Karpathy-format dataset: schema, captions, image files (great-expectations)",
        description=(
            "Validate a Karpathy-format dataset JSON and its images. Exit 0 when clean (warnings "
            "allowed), 1 when problems are found, 2 when the JSON is unreadable or malformed."
        ),
    )
    p.add_argument("dataset", metavar="DATASET_JSON", help="Karpathy-format JSON (Flickr8k/30k, COCO)")
    p.add_argument(
        "--image-root", metavar="DIR", help="folder image paths are relative to (default: the JSON's)"
    )
    p.add_argument("--split", metavar="S", help="check only this split")
    p.add_argument(
        "--report", metavar="PATH",
        help=f"JSON report path (default: {DEFAULT_REPORT_DIR}/<dataset name>[.<split>].json)",
    )
    p.add_argument("--workers", type=int, metavar="N", help="image-checking threads")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="read images whose path leads outside the image root (refused by default)")
    p.add_argument(
        "--splits", default=",".join(DEFAULT_SPLITS), metavar="A,B",
        help="allowed split values (default: %(default)s)",
    )
    p.add_argument("--min-words", type=int, default=defaults.min_words, metavar="N",
                   help="shortest caption in words (default: %(default)s)")
    p.add_argument("--max-words", type=int, default=defaults.max_words, metavar="N",
                   help="longest caption in words (default: %(default)s)")
    p.add_argument("--max-chars", type=int, default=defaults.max_chars, metavar="N",
                   help="longest caption in characters (default: %(default)s)")
    p.add_argument("--captions-per-image", type=int, default=defaults.captions_per_image, metavar="N",
                   help="expected captions per image; other counts are warnings (default: %(default)s)")
    p.add_argument("--examples", type=int, default=5, metavar="N",
                   help="examples printed per kind of problem (default: %(default)s)")
    p.set_defaults(func=run)


def default_report_path(dataset: str, split: str | None) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset) + (f".{split}" if split else "")
    return DEFAULT_REPORT_DIR / f"{name}.json"


def run(args: argparse.Namespace) -> int:
    limits = ValidationLimits(
        allowed_splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
        min_words=args.min_words,
        max_words=args.max_words,
        max_chars=args.max_chars,
        captions_per_image=args.captions_per_image,
    )
    # The report's place is checked before the work: a folder there must not cost a whole validation.
    if args.report:
        check_output_file(args.report, "--report")
    else:
        check_output_dir(DEFAULT_REPORT_DIR, "report folder")
    report = validate_dataset(
        args.dataset, image_root=args.image_root, split=args.split, workers=args.workers, limits=limits,
        allow_outside_root=args.allow_outside_root,
    )
    path = Path(args.report) if args.report else default_report_path(report.dataset, report.split)
    atomic_write_json(path, report.to_dict())
    summary = format_summary(report, max_examples=max(args.examples, 0))
    head, _, verdict = summary.rpartition("\n")
    print(f"{head}\nreport: {path}\n{verdict}")
    return 0 if report.ok else 1
