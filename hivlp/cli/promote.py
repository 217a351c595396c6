"""`hivlp promote`: register a checkpoint in the MLflow model registry and gate it onto an alias
(`hivlp.gate`: metrics bound to the checkpoint, the champion re-evaluated on the same split, a strict
gain of --min-delta).

Exit codes: 0 promoted or already the champion, 3 gated out (registered, but the alias stayed where
it was), 1 registry errors (tracking store unreachable, the champion's checkpoint gone), 2 usage
errors (no such checkpoint, metrics of another checkpoint or split).
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
        help="register a checkpoint in MLflow and move the 'champion' alias to it if it beats the champion",
        description=(
            "Register a checkpoint (models from code, logged once; a version already holding its weights is "
            "reused) and give it the alias (default 'champion') only if: --metrics is this checkpoint's "
            "evaluation on --gate-split (weights hash, split and dataset recorded by `hivlp evaluate`); its AR "
            ">= --min-r-mean; and it beats the current champion, evaluated again now on the same data, by at "
            "least --min-delta AR (a tie never promotes). The champion's own weights again: 'already "
            "champion', nothing registered. The decision goes onto the version (hivlp.gate.* tags), its "
            "logged model and a 'gate' run (gate.json). Exit 0 promoted or already champion, 3 gated out, "
            "1/2 errors. The store is $MLFLOW_TRACKING_URI, else sqlite at outputs/mlflow.db."
        ),
    )
    p.add_argument("--checkpoint", default="outputs/finetune", metavar="DIR",
                   help="checkpoint folder (default: %(default)s)")
    p.add_argument("--metrics", required=True, metavar="JSON",
                   help="the checkpoint's evaluation on the gate split (`hivlp evaluate --split S --out JSON`)")
    p.add_argument("--gate-split", default="test", metavar="SPLIT",
                   help="split the gate compares on, one the checkpoint was not selected on (default: %(default)s; "
                        "Flickr8k here has no test split: --gate-split val, stated in the decision)")
    p.add_argument("--dataset", metavar="JSON",
                   help="dataset the champion is re-evaluated on (default: the one --metrics records; it must be "
                        "the same JSON)")
    p.add_argument("--image-root", metavar="DIR", help="image folder (default: the one --metrics records)")
    p.add_argument("--min-delta", type=float, default=0.1, metavar="AR",
                   help="gain in AR over the re-evaluated champion needed to promote (default: %(default)s)")
    p.add_argument("--min-r-mean", type=float, default=0.0, metavar="AR",
                   help="floor on the gate split's AR, in percent (default: %(default)s)")
    p.add_argument("--run-id", metavar="ID",
                   help="the MLflow run the model is logged into when training did not log it "
                        "(default: the training run recorded in the checkpoint)")
    p.add_argument("--name", default="hivlp", help="registered model name (default: %(default)s)")
    p.add_argument("--alias", default="champion", help="alias to move (default: %(default)s)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite)")
    p.add_argument("--device", default="auto", help="device for the champion's evaluation (default: %(default)s)")
    p.add_argument("--out", metavar="JSON", help="also write the decision as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hivlp.gate import promote
    from hivlp.io import check_output_file

    if args.out:
        check_output_file(args.out, "--out")  # before registering: a new version must not end in an error
    result = promote(
        args.checkpoint, args.metrics, gate_split=args.gate_split, dataset=args.dataset, image_root=args.image_root,
        name=args.name, alias=args.alias, min_delta=args.min_delta, min_value=args.min_r_mean, run_id=args.run_id,
        tracking_uri=args.tracking_uri, device=args.device,
    )
    if args.out:
        atomic_write_json(Path(args.out), result.to_dict())
    verdict = {"promoted": f"promoted to @{result.alias}", "already-champion": f"already champion (@{result.alias})",
               "gated-out": f"gated out (@{result.alias} unchanged)"}[result.status]
    print(f"{result.name} version {result.version}: {verdict}\n  {result.reason}")
    print(json.dumps(result.to_dict(), indent=2))
    return 0 if result.promoted else GATED_OUT
