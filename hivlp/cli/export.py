"""`hivlp export`: image and caption embeddings of one split as Parquet shards plus a manifest."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write image + caption embeddings of a split to Parquet shards (for `hivlp index`)",
        description=(
            "Embed the images and captions of one split with a checkpoint and write them (full "
            "dimension; every level is a prefix) to Parquet shards with a manifest. Shard i/n takes "
            "a fixed slice of the images and their captions, so n tasks can run in parallel; "
            "re-running a finished shard does nothing. Ids: images = imgid, captions = 10^9 + sentid."
        ),
    )
    p.add_argument("--checkpoint", default="outputs/finetune", metavar="DIR",
                   help="checkpoint folder (default: %(default)s)")
    p.add_argument("--dataset", required=True, metavar="JSON", help="Karpathy-format dataset JSON")
    p.add_argument("--split", default="val", help="split to export (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="export folder (shards + manifest.json)")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="this task's shard, 0-based (default: %(default)s)")
    p.add_argument("--image-root", metavar="DIR", help="folder image paths are relative to (default: the JSON's)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per batch (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: %(default)s)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="read images whose path leads outside the image root (refused by default)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hivlp.embeddings.export import export_embeddings
    from hivlp.embeddings.format import parse_shard, read_manifest

    shard = parse_shard(args.shard)
    path = export_embeddings(
        args.checkpoint, args.dataset, args.split, args.out, image_root=args.image_root, shard=shard,
        batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
        allow_outside_root=args.allow_outside_root,
    )
    m = read_manifest(args.out)
    state = "complete" if m["complete"] else f"shards still missing: {m['missing_shards']}"
    print(f"shard {shard[0]}/{shard[1]}: {path}")
    print(f"{args.out}: {m['counts']['image']} images, {m['counts']['text']} captions, dim {m['dim']}, "
          f"{len(m['shards'])}/{m['num_shards']} shards ({state})")
    return 0
