"""`hivlp index`: load an embedding export into Milvus as `<name>_coarse` + `<name>_fine`."""

from __future__ import annotations

import argparse
import json

# pymilvus loads inside the index's methods; this import costs numpy only.
from hivlp.retrieval.milvus import (
    DEFAULT_KEEP,
    DEFAULT_NAME,
    DEFAULT_URI,
    INDEX_TYPES,
    KINDS,
    quiet_backend_logs,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index",
        help="index exported embeddings in Milvus (coarse prefix + full vectors)",
        description=(
            "Load an export folder (`hivlp export`) into a new version of two Milvus collections, "
            "<name>__v<N>_coarse (the first --coarse-dim dims, renormalised, ANN index) and "
            "<name>__v<N>_fine (full vectors, for the re-rank; also kept in a local memory-mapped "
            "store), verify it, then move the aliases <name>_coarse / <name>_fine to it: searches "
            "switch at once and never see a half-built index. The served version is left alone when "
            "it already holds this export; a failed build is dropped; an interrupted one is completed "
            "by the next run. A .db path is Milvus Lite; http://host:19530 a server (token from "
            "$MILVUS_TOKEN)."
        ),
    )
    p.add_argument("--embeddings", required=True, metavar="DIR", help="export folder with manifest.json")
    p.add_argument("--uri", default=DEFAULT_URI, help="Milvus Lite .db path or server URI (default: %(default)s)")
    p.add_argument("--name", default=DEFAULT_NAME, help="collection name prefix (default: %(default)s)")
    p.add_argument("--coarse-dim", type=int, default=64, metavar="D",
                   help="coarse prefix dims (default: %(default)s)")
    p.add_argument("--index", default="HNSW", type=str.upper, choices=INDEX_TYPES,
                   help="ANN index of the coarse collection (default: %(default)s)")
    p.add_argument("--kinds", default=",".join(KINDS), metavar="K,K",
                   help="which rows to index: image, text or both (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=2000, metavar="N",
                   help="rows per upsert (default: %(default)s)")
    p.add_argument("--keep", type=int, default=DEFAULT_KEEP, metavar="N",
                   help="previous versions kept after the swap, newest first (default: %(default)s)")
    p.add_argument("--store", metavar="DIR",
                   help="local full-vector store folder (default: <db>.vectors beside a Lite file, "
                        "outputs/milvus/vectors/<host_port> for a server; $HIVLP_VECTOR_STORE overrides)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_backend_logs()
    from hivlp.retrieval.milvus import MilvusDualIndex, check_build_args

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    # before connecting: a bad argument never waits on a lock or touches the index
    check_build_args(args.batch_size, args.keep, args.coarse_dim, args.index, kinds)
    with MilvusDualIndex(args.uri, args.name, store_dir=args.store) as index:
        summary = index.build(
            args.embeddings, coarse_dim=args.coarse_dim, index=args.index, kinds=kinds,
            batch_size=args.batch_size, progress=not args.no_progress, keep=args.keep,
        )
    print(json.dumps(summary, indent=2))
    return 0
