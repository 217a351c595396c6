"""`hivlp search`: one text or image query through a Milvus dual-collection index."""

from __future__ import annotations

import argparse
import json
import sys

from hivlp.retrieval.milvus import DEFAULT_NAME, DEFAULT_URI, quiet_backend_logs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search",
        help="search a Milvus index with a caption or an image",
        description=(
            "Encode a caption (searches images) or an image (searches captions) with a checkpoint, "
            "search <name>_coarse for a shortlist, re-rank it with the full vectors (the local store "
            "beside the index, else <name>_fine) and print the top k. --k and --shortlist are capped "
            "at the rows searched and Milvus's top-k limit (16384), with a note."
        ),
    )
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", metavar="CAPTION", help="caption query: returns images")
    q.add_argument("--image", metavar="PATH", help="image query: returns captions")
    p.add_argument("--uri", default=DEFAULT_URI, help="Milvus Lite .db path or server URI (default: %(default)s)")
    p.add_argument("--name", default=DEFAULT_NAME, help="collection name prefix (default: %(default)s)")
    p.add_argument("--k", type=int, default=10, help="results to show (default: %(default)s)")
    p.add_argument("--shortlist", type=int, default=100, help="coarse candidates re-ranked (default: %(default)s)")
    p.add_argument("--store", metavar="DIR",
                   help="local full-vector store written by `hivlp index` (default: as `hivlp index`); "
                        "without one the re-rank fetches full vectors from Milvus")
    p.add_argument("--level", default="fine", choices=("fine", "coarse"),
                   help="fine: coarse shortlist re-ranked with the full vectors; coarse: the coarse prefix "
                        "alone (default: %(default)s)")
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
    from hivlp.retrieval.milvus import MilvusDualIndex
    from hivlp.retrieval.search import check_text_query, query_encoder, search

    if args.k < 1 or args.shortlist < 1:
        raise UsageError("--k and --shortlist must be >= 1")
    # The query itself is checked before the index opens and the model loads.
    if args.text is not None:
        check_text_query(args.text)
    else:
        from hivlp.data.images import load_image

        load_image(args.image)  # missing, undecodable or a decompression bomb: one named error
    with MilvusDualIndex(args.uri, args.name, store_dir=args.store) as index:
        index.info()  # fail fast (missing/incomplete index) before loading the model
        encoder = query_encoder(None if args.model_uri else args.checkpoint, args.model_uri, args.device)
        response = search(index, encoder, text=args.text, image=args.image, k=args.k, shortlist=args.shortlist,
                          level=args.level)
    if args.json:
        print(json.dumps(response.to_dict(), indent=2))
        return 0
    for note in response.notes:
        print(f"note: {note}", file=sys.stderr)
    for h in response.hits:
        line = f"{h.rank:>3}  {h.score:.4f}  {h.filename or h.id}"
        if response.searched == "text":
            line += f"  {h.caption}"
        print(line)
    return 0
