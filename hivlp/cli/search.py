"""`hivlp search`: one text or image query through a Milvus dual-collection index."""

from __future__ import annotations

import argparse
import json
import logging

from hivlp.retrieval.milvus import DEFAULT_NAME, DEFAULT_URI, quiet_backend_logs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search",
        help="search a Milvus index with a caption or an image",
        description=(
            "Encode a caption (searches images) or an image (searches captions) with a checkpoint, "
            "search <name>_coarse for a shortlist, re-rank it with the full vectors from "
            "<name>_fine and print the top k."
        ),
    )
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", metavar="CAPTION", help="caption query: returns images")
    q.add_argument("--image", metavar="PATH", help="image query: returns captions")
    p.add_argument("--uri", default=DEFAULT_URI, help="Milvus Lite .db path or server URI (default: %(default)s)")
    p.add_argument("--name", default=DEFAULT_NAME, help="collection name prefix (default: %(default)s)")
    p.add_argument("--k", type=int, default=10, help="results to show (default: %(default)s)")
    p.add_argument("--shortlist", type=int, default=100, help="coarse candidates re-ranked (default: %(default)s)")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--checkpoint", default="outputs/finetune", metavar="DIR",
                   help="checkpoint that encodes the query (default: %(default)s)")
    m.add_argument("--model-uri", metavar="URI",
                   help="MLflow model that encodes the query instead, e.g. models:/hivlp@champion "
                        "(tracking store: $MLFLOW_TRACKING_URI or sqlite under outputs/)")
    p.add_argument("--device", default="cpu", help="device for the query encoder (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_backend_logs()
    from hivlp.errors import UsageError

    if args.k < 1 or args.shortlist < 1:
        raise UsageError("--k and --shortlist must be >= 1")

    from hivlp.retrieval.milvus import DimensionMismatchError, MilvusDualIndex

    with MilvusDualIndex(args.uri, args.name) as index:
        info = index.info()  # fail fast (missing/incomplete index) before loading the model
        kind = "image" if args.text is not None else "text"
        query, source, weights_sha = _encode_query(args)
        if query.shape[1] != info.dim:
            raise DimensionMismatchError(
                f"the model {source} makes {query.shape[1]}-d embeddings but index "
                f"{args.name!r} at {args.uri} holds {info.dim}-d vectors; search with the model "
                "the index was built from, or re-run `hivlp export` and `hivlp index` with this one"
            )
        if weights_sha and info.weights_sha256 not in ("arrays", weights_sha):
            logging.getLogger("hivlp.search").warning(
                "index %r was built from other weights (sha256 %s...) than %s; results may be meaningless",
                args.name, info.weights_sha256[:12], source,
            )
        result = index.search(query, k=args.k, shortlist=args.shortlist, kind=kind)
        ids, scores = result.ids[0], result.scores[0]
        meta = index.describe(ids)
    hits = [
        {"rank": r + 1, "id": int(i), "score": float(s), **meta.get(int(i), {})}
        for r, (i, s) in enumerate(zip(ids, scores)) if i >= 0
    ]
    if args.json:
        query_json = {"text": args.text, "image": args.image}
        print(json.dumps({"query": query_json, "searched": kind, "hits": hits}, indent=2))
        return 0
    for h in hits:
        line = f"{h['rank']:>3}  {h['score']:.4f}  {h.get('filename') or h['id']}"
        if kind == "text":
            line += f"  {h.get('caption')}"
        print(line)
    return 0


def _encode_query(args: argparse.Namespace):
    """(query [1, D], where the model came from, its weights sha256 or None) from a checkpoint or MLflow."""
    import numpy as np

    if args.model_uri:
        import pandas as pd

        from hivlp.registry import connect

        connect()
        import mlflow

        try:
            model = mlflow.pyfunc.load_model(args.model_uri)
        except mlflow.exceptions.MlflowException as e:
            from hivlp.errors import UsageError

            raise UsageError(f"--model-uri {args.model_uri}: cannot load it ({e})") from None
        column = {"text": args.text} if args.text is not None else {"image_path": args.image}
        query = np.asarray(model.predict(pd.DataFrame([column])), dtype=np.float32)
        sha = (model.metadata.metadata or {}).get("hivlp_weights_sha256")
        return query, args.model_uri, sha

    from hivlp.export import checkpoint_sha256
    from hivlp.model import load_checkpoint
    from hivlp.model.encode import encode_images, encode_texts

    model, _ = load_checkpoint(args.checkpoint, device=args.device)
    if args.text is not None:
        query = encode_texts(model, [args.text], device=args.device, progress=False)
    else:
        query = encode_images(model, [args.image], batch_size=1, device=args.device, num_workers=0, progress=False)
    return query, args.checkpoint, checkpoint_sha256(args.checkpoint)
