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
    m.add_argument("--model-uri", metavar="URI", help="MLflow model URI (models:/NAME@champion): not supported yet")
    p.add_argument("--device", default="cpu", help="device for the query encoder (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_backend_logs()
    from hivlp.errors import UsageError

    if args.model_uri:
        raise UsageError(
            f"--model-uri {args.model_uri}: loading the query encoder from the MLflow registry is not "
            "supported yet; pass --checkpoint DIR (the folder the index's embeddings were exported with)"
        )
    if args.k < 1 or args.shortlist < 1:
        raise UsageError("--k and --shortlist must be >= 1")

    from hivlp.export import checkpoint_sha256
    from hivlp.model import load_checkpoint
    from hivlp.model.encode import encode_images, encode_texts
    from hivlp.retrieval.milvus import DimensionMismatchError, MilvusDualIndex

    with MilvusDualIndex(args.uri, args.name) as index:
        info = index.info()  # fail fast (missing/incomplete index) before loading the model
        model, _ = load_checkpoint(args.checkpoint, device=args.device)
        if model.embed_dim != info.dim:
            raise DimensionMismatchError(
                f"the model in {args.checkpoint} makes {model.embed_dim}-d embeddings but index "
                f"{args.name!r} at {args.uri} holds {info.dim}-d vectors; search with the checkpoint "
                "the index was built from, or re-run `hivlp export` and `hivlp index` with this one"
            )
        if info.weights_sha256 not in ("arrays", checkpoint_sha256(args.checkpoint)):
            logging.getLogger("hivlp.search").warning(
                "index %r was built from other weights (sha256 %s...) than %s; results may be meaningless",
                args.name, info.weights_sha256[:12], args.checkpoint,
            )
        if args.text is not None:
            query, kind = encode_texts(model, [args.text], device=args.device, progress=False), "image"
        else:
            query = encode_images(
                model, [args.image], batch_size=1, device=args.device, num_workers=0, progress=False
            )
            kind = "text"
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
