"""`hivlp promote`: register a checkpoint in the MLflow model registry and gate it onto an alias.

Exit codes: 0 promoted, 3 gated out (registered, but the alias stayed where it was), 1 registry
errors (tracking store unreachable, a champion with no recorded metric), 2 usage errors (no such
checkpoint, run or metrics file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hivlp.io import atomic_write_json

GATED_OUT = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "promote",
        help="register a checkpoint in MLflow and move the 'champion' alias to it if it is better",
        description=(
            "Log a checkpoint as an MLflow pyfunc model, register it as a new version, and give it the "
            "alias (default 'champion') only if its val AR (full.r_mean of --metrics, or best_val_r_mean "
            "of --run-id) is >= --min-r-mean and >= the current champion's. The decision is recorded as "
            "hivlp.* tags on the version. Exit 0 promoted, 3 gated out, 1/2 errors. The store is "
            "$MLFLOW_TRACKING_URI, else sqlite at outputs/mlflow.db."
        ),
    )
    p.add_argument("--checkpoint", default="outputs/finetune", metavar="DIR",
                   help="checkpoint folder (default: %(default)s)")
    p.add_argument("--metrics", metavar="JSON",
                   help="evaluation metrics of the checkpoint on val (`hivlp evaluate --out`)")
    p.add_argument("--run-id", metavar="ID",
                   help="the MLflow run that trained the checkpoint: the model is logged into it, and its "
                        "best_val_r_mean is the metric when --metrics is not given")
    p.add_argument("--name", default="hivlp", help="registered model name (default: %(default)s)")
    p.add_argument("--min-r-mean", type=float, default=0.0, metavar="AR",
                   help="floor on val AR, in percent (default: %(default)s: only the champion comparison)")
    p.add_argument("--alias", default="champion", help="alias to move (default: %(default)s)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite)")
    p.add_argument("--out", metavar="JSON", help="also write the decision as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hivlp.io import check_output_file
    from hivlp.registry import register_and_promote

    if args.out:
        check_output_file(args.out, "--out")  # before registering: a new version must not end in an error
    result = register_and_promote(
        args.checkpoint, metrics_path=args.metrics, run_id=args.run_id, name=args.name,
        min_value=args.min_r_mean, alias=args.alias, tracking_uri=args.tracking_uri,
    )
    if args.out:
        atomic_write_json(Path(args.out), result.to_dict())
    verdict = f"promoted to @{result.alias}" if result.promoted else f"gated out (@{result.alias} unchanged)"
    print(f"{result.name} version {result.version}: {verdict}\n  {result.reason}")
    print(json.dumps(result.to_dict(), indent=2))
    return 0 if result.promoted else GATED_OUT
