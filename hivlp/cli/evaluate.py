"""`hivlp evaluate`: Recall@K (ALBEF/BLIP protocol) of a checkpoint on one split, at every nested level
and through coarse-to-fine search; writes a metrics JSON and prints a per-level table."""

from __future__ import annotations

import argparse

from hivlp.config import DEFAULT_DATASET

DEFAULT_CHECKPOINT = "outputs/finetune"
DEFAULT_OUT = "outputs/metrics.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="Recall@K per level and coarse-to-fine on a split; metrics JSON + table",
        description=__doc__,
    )
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint folder (default: %(default)s)")
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="Karpathy-format JSON (default: %(default)s)")
    p.add_argument("--image-root", help="folder image paths are relative to (default: the JSON's)")
    p.add_argument("--split", default="val", help="split to evaluate, e.g. val or test (default: %(default)s)")
    p.add_argument("--out", default=DEFAULT_OUT, help="metrics JSON, written atomically (default: %(default)s)")
    p.add_argument("--shortlist", type=int, default=100, help="coarse-to-fine shortlist K (default: %(default)s)")
    p.add_argument("--coarse-dim", type=int, default=64, help="coarse prefix dims (default: %(default)s)")
    p.add_argument("--codes", choices=("fp32", "int8", "binary"), default="fp32",
                   help="coarse codes of the in-memory engine (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoding batch (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--backend", choices=("memory", "milvus"), default="memory",
                   help="milvus: also run coarse-to-fine through a Milvus dual-collection index (default: %(default)s)")
    p.add_argument("--uri", help="Milvus URI for --backend milvus (a .db path is Milvus Lite)")
    p.add_argument("--name", help="Milvus index name for --backend milvus (temporary collections derive from it)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="read images whose path leads outside the image root (refused by default)")
    p.add_argument("--track", action="store_true",
                   help="also record the evaluation as an MLflow run 'evaluate' (lineage, AR per level, metrics.json) "
                        "in the checkpoint's experiment")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow store for --track (default: $MLFLOW_TRACKING_URI or sqlite under outputs/)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hivlp.errors import UsageError
    from hivlp.io import atomic_write_json, check_output_file
    from hivlp.retrieval.evaluate import evaluate_checkpoint, format_table

    if args.shortlist < 1 or args.batch_size < 1 or args.coarse_dim < 1:
        raise UsageError("--shortlist, --batch-size and --coarse-dim must be >= 1")
    if args.tracking_uri and not args.track:
        raise UsageError("--tracking-uri applies to --track only")
    if args.backend != "milvus" and (args.uri or args.name):
        raise UsageError("--uri and --name apply to --backend milvus only")
    check_output_file(args.out, "--out")  # before encoding, not after
    metrics = evaluate_checkpoint(
        args.checkpoint, args.dataset, split=args.split, image_root=args.image_root,
        shortlist=args.shortlist, coarse_dim=args.coarse_dim, batch_size=args.batch_size,
        device=args.device, backend=args.backend, codes=args.codes, uri=args.uri, name=args.name,
        allow_outside_root=args.allow_outside_root,
    )
    atomic_write_json(args.out, metrics)
    if args.track:
        from hivlp.tracking import track_evaluation

        track_evaluation(metrics, args.checkpoint, uri=args.tracking_uri)
    counts = metrics["counts"]
    print(f"{args.split}: {counts['images']} images, {counts['texts']} captions, {counts['dim']}-d "
          f"(encoded in {metrics['timings']['encode_s']:.1f} s)")
    print(format_table(metrics))
    print(f"wrote {args.out}")
    return 0

