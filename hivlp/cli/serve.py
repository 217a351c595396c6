"""`hivlp serve`: the search service (JSON API, thumbnails, a web page) over an index and a model."""

from __future__ import annotations

import argparse

from hivlp.retrieval.milvus import DEFAULT_NAME, quiet_backend_logs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="HTTP search service and web page over an index (FastAPI + uvicorn)",
        description=(
            "Load the model and the index once and serve GET/POST /api/search, /thumbs/{id}, /healthz, "
            "/docs and a search page at /. The index: a Milvus one built by `hivlp index` (--uri, --name) "
            "or an export folder searched in memory (--embeddings alone). Thumbnails come from the dataset "
            "the export's manifest names (--embeddings), or from --dataset."
        ),
    )
    src = p.add_argument_group("index")
    src.add_argument("--uri", help="Milvus Lite .db path or server URI of an index built by `hivlp index`")
    src.add_argument("--name", default=DEFAULT_NAME, help="collection name prefix (default: %(default)s)")
    src.add_argument("--embeddings", metavar="DIR",
                     help="export folder: searched in memory without --uri; with --uri, its manifest names "
                          "the dataset the thumbnails come from")
    src.add_argument("--coarse-dim", type=int, default=64, metavar="D",
                     help="coarse prefix of the in-memory index (default: %(default)s)")
    src.add_argument("--dataset", metavar="JSON", help="dataset JSON of the thumbnails (default: the export's)")
    src.add_argument("--image-root", metavar="DIR",
                     help="folder the images lie under (default: the dataset JSON's folder); no file "
                          "outside it is ever served")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--checkpoint", default="outputs/finetune", metavar="DIR",
                   help="checkpoint that encodes queries (default: %(default)s)")
    m.add_argument("--model-uri", metavar="URI", help="MLflow model instead, e.g. models:/hivlp@champion")
    p.add_argument("--device", default="cpu", help="device for the query encoder (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--max-k", type=int, default=100, help="largest k a request gets (default: %(default)s)")
    p.add_argument("--max-shortlist", type=int, default=2000,
                   help="largest shortlist a request gets (default: %(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=10.0,
                   help="largest image upload in MiB (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_backend_logs()
    from hivlp.errors import UsageError
    from hivlp.serve.app import Limits, open_service, serve

    for flag, value in (("--max-k", args.max_k), ("--max-shortlist", args.max_shortlist),
                        ("--max-upload-mb", args.max_upload_mb)):
        if value <= 0:
            raise UsageError(f"{flag} must be > 0, got {value}")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: expected 1-65535")
    limits = Limits(max_k=args.max_k, max_shortlist=args.max_shortlist,
                    max_upload_bytes=int(args.max_upload_mb * 2**20))
    service = open_service(
        uri=args.uri, name=args.name, embeddings=args.embeddings, checkpoint=None if args.model_uri else args.checkpoint,
        model_uri=args.model_uri, dataset=args.dataset, image_root=args.image_root, coarse_dim=args.coarse_dim,
        device=args.device, limits=limits,
    )
    try:
        serve(service, host=args.host, port=args.port, log_level="debug" if args.verbose else "info")
    finally:
        service.close()
    return 0
