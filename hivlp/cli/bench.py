"""`hivlp bench`: measured benchmarks. `hivlp bench retrieval`: exact vs coarse-to-fine search as the
gallery grows (latency single and batched, bytes per item, true-image recall, agreement with exact).
`hivlp bench serve`: a load test of `hivlp serve` on loopback (latency percentiles, errors).
`hivlp bench text`: ms per caption through each text tower (single and batched).
`hivlp bench milvus`: served coarse-to-fine vs a full-dim HNSW collection on a real Milvus server and Lite."""

from __future__ import annotations

import argparse

from hivlp.config import DEFAULT_DATASET
from hivlp.errors import UsageError

DEFAULT_OUT = "bench/results/retrieval.json"
DEFAULT_CHECKPOINT = "outputs/finetune"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (retrieval speed and quality)", description=__doc__)
    sub = p.add_subparsers(dest="bench", metavar="BENCH")
    r = sub.add_parser(
        "retrieval",
        help="exact vs coarse-to-fine search at growing gallery sizes; JSON + PNG plots",
        description=(
            "Real val captions as queries against galleries of N items: their true images plus "
            "Gaussian distractors fitted to the real image embeddings. Methods: exact numpy matmul, "
            "FAISS flat, coarse-to-fine with fp32 / int8 / binary coarse codes, FAISS IVF-Flat and HNSW "
            "over the full vectors and over the prefix with a full re-rank, tuned to --target-agreement "
            "(and Milvus Lite at N=100k when available). Embeddings come from --embeddings, else from --checkpoint "
            "(encoded once, cached under --cache-dir)."
        ),
    )
    r.add_argument("--out", default=DEFAULT_OUT,
                   help="results JSON; plots are written beside it (default: %(default)s)")
    src = r.add_argument_group("embeddings")
    src.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="model checkpoint folder (default: %(default)s)")
    src.add_argument("--dataset", default=DEFAULT_DATASET, help="Karpathy-format JSON (default: %(default)s)")
    src.add_argument("--image-root", help="folder image paths are relative to (default: the JSON's)")
    src.add_argument("--embeddings", metavar="FILE.npz",
                     help="precomputed embeddings: image, text, text_to_image [, extra_image, levels]")
    src.add_argument("--synthetic", action="store_true",
                     help="structured synthetic embeddings instead of a model (development only)")
    src.add_argument("--no-fit-train", action="store_true",
                     help="fit the distractors to the val images only (skips encoding the train images)")
    src.add_argument("--cache-dir", default="outputs/cache/bench",
                     help="encoded-embeddings cache; Milvus Lite's temporary files go here too (default: %(default)s)")
    src.add_argument("--device", default="auto", help="encoding device: auto, cpu, cuda (default: %(default)s)")
    src.add_argument("--allow-outside-root", action="store_true",
                     help="read images whose path leads outside the image root (refused by default)")
    src.add_argument("--encode-batch-size", type=int, default=64,
                     help="images per encoding batch (default: %(default)s)")
    run_g = r.add_argument_group("run")
    run_g.add_argument("--sizes", type=_int_list, default="1000,10000,100000,1000000",
                       help="gallery sizes, comma-separated (default: %(default)s)")
    run_g.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    run_g.add_argument("--threads", type=int, default=2, help="threads for every kernel (default: %(default)s)")
    run_g.add_argument("--repeats", type=int, default=20, help="single-query searches timed (default: %(default)s)")
    run_g.add_argument("--batch", type=int, default=256, help="queries per batched search (default: %(default)s)")
    run_g.add_argument("--queries", type=int, default=1000,
                       help="captions used for recall and batch timing, 0 = all (default: %(default)s)")
    run_g.add_argument("--shortlist", type=int, default=1000, help="coarse-to-fine shortlist K (default: %(default)s)")
    run_g.add_argument("--coarse-dim", type=int, default=64,
                       help="prefix for fp32/int8 coarse codes (default: %(default)s)")
    run_g.add_argument("--binary-dim", type=int, default=64,
                       help="prefix the binary codes are projected from (default: %(default)s)")
    run_g.add_argument("--binary-bits", type=int, default=256, help="binary code length (default: %(default)s)")
    run_g.add_argument("--binary-shortlist", type=int, default=0,
                       help="Hamming shortlist of c2f_binary; 0 = the shortest on a 1.5x ladder whose top-10 "
                            "agreement on the held-out tuning captions reaches --target-agreement (default: %(default)s)")
    run_g.add_argument("--binary-keep", type=int, default=1000,
                       help="c2f_binary candidates kept after exact re-scoring at --binary-dim, 0 = "
                            "straight to full dims (default: %(default)s)")
    run_g.add_argument("--no-milvus", action="store_true", help="skip the Milvus Lite rows at N=100k")
    run_g.add_argument("--milvus-queries", type=int, default=200,
                       help="queries sent through Milvus Lite, the first of --queries (default: %(default)s)")
    run_g.add_argument("--seed", type=int, default=0, help="query sample and distractor seed (default: %(default)s)")
    ann = r.add_argument_group("ANN peers (FAISS IVF-Flat / HNSW, full-dim and over the prefix + re-rank)")
    ann.add_argument("--target-agreement", type=float, default=0.99,
                     help="nprobe / efSearch are raised until top-10 agreement with exact search reaches this "
                          "(default: %(default)s)")
    ann.add_argument("--tune-queries", type=int, default=500,
                     help="held-out captions (not among --queries) the tuner uses (default: %(default)s)")
    ann.add_argument("--ann-shortlist", type=int, default=0,
                     help="re-rank list of ivf_c2f / hnsw_c2f; 0 = the shortest whose exact-prefix ceiling "
                          "reaches the target (default: %(default)s)")
    ann.add_argument("--nlist", type=int, default=0, help="IVF lists; 0 = about 4 sqrt(N) (default: %(default)s)")
    ann.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node (default: %(default)s)")
    ann.add_argument("--ef-construction", type=int, default=40, help="HNSW efConstruction (default: %(default)s)")
    ann.add_argument("--hnsw-build-limit", type=float, default=600,
                     help="seconds: HNSW is skipped at a size whose build, extrapolated from the previous "
                          "size, would take longer (default: %(default)s)")
    r.set_defaults(func=run_retrieval)
    register_serve(sub)
    register_text(sub)
    register_milvus(sub)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def run_retrieval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hivlp.bench.retrieval import (
        METHODS,
        BenchConfig,
        BenchEmbeddings,
        encode_embeddings,
        format_rows,
        run_retrieval_bench,
        synthetic_embeddings,
        write_results,
    )

    methods = METHODS if args.methods is None else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for name, value in (("--threads", args.threads), ("--repeats", args.repeats), ("--batch", args.batch),
                        ("--shortlist", args.shortlist)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if args.binary_shortlist < 0:
        raise UsageError(f"--binary-shortlist must be >= 0 (0 = tuned), got {args.binary_shortlist}")
    if args.embeddings and args.synthetic:
        raise UsageError("pass either --embeddings or --synthetic, not both")
    if not 0 < args.target_agreement <= 1:
        raise UsageError(f"--target-agreement must be in (0, 1], got {args.target_agreement}")
    for name, value in (("--tune-queries", args.tune_queries), ("--hnsw-m", args.hnsw_m),
                        ("--ef-construction", args.ef_construction)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if args.ann_shortlist < 0 or args.nlist < 0 or args.hnsw_build_limit <= 0:
        raise UsageError("--ann-shortlist and --nlist must be >= 0 (0 = automatic), --hnsw-build-limit > 0")
    if args.encode_batch_size < 1 or args.queries < 0:
        raise UsageError("--encode-batch-size must be >= 1 and --queries >= 0")
    from hivlp.io import check_output_file

    check_output_file(args.out, "--out")  # before the encoding and the measurements, not after
    if args.embeddings:
        emb = BenchEmbeddings.load(args.embeddings)
    elif args.synthetic:
        emb = synthetic_embeddings()
    else:
        emb = encode_embeddings(
            args.checkpoint, args.dataset, args.image_root, device=args.device,
            batch_size=args.encode_batch_size, fit_train=not args.no_fit_train, cache_dir=args.cache_dir,
            allow_outside_root=args.allow_outside_root,
        )
    cfg = BenchConfig(
        sizes=args.sizes, methods=methods, threads=args.threads, repeats=args.repeats, batch=args.batch,
        queries=args.queries, shortlist=args.shortlist, coarse_dim=args.coarse_dim,
        binary_dim=args.binary_dim, binary_bits=args.binary_bits, binary_shortlist=args.binary_shortlist,
        binary_keep=args.binary_keep, milvus=not args.no_milvus, milvus_queries=args.milvus_queries, seed=args.seed,
        target_agreement=args.target_agreement, tune_queries=args.tune_queries, ann_shortlist=args.ann_shortlist,
        nlist=args.nlist, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
        hnsw_build_limit_s=args.hnsw_build_limit,
    )
    out = Path(args.out)
    # Milvus Lite's files go under the cache folder, not /tmp, which others may clean while it runs.
    # After each size the results so far go to --out (marked partial): a run stopped at 1M keeps the rest.
    result = run_retrieval_bench(emb, cfg, workdir=args.cache_dir, partial_out=out)
    written = write_results(result, out)
    print(format_rows(result))
    for note in result["notes"]:
        print(f"note: {note}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0



def register_serve(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve",
        help="load test of `hivlp serve` on loopback: p50/p99 latency and errors; JSON",
        description=(
            "Start the real `hivlp serve` (uvicorn) on a free loopback port for each index, send "
            "--requests caption queries (val captions of the export) from --concurrency clients and "
            "write latency percentiles, throughput and errors. Scenarios: the export in memory, and the "
            "Milvus index at --uri/--name when given."
        ),
    )
    s.add_argument("--embeddings", required=True, metavar="DIR", help="export folder (queries, thumbnails, in-memory index)")
    s.add_argument("--uri", help="also load-test this Milvus index (built by `hivlp index` from --embeddings)")
    s.add_argument("--name", default="hivlp", help="Milvus collection name prefix (default: %(default)s)")
    s.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="model checkpoint folder (default: %(default)s)")
    s.add_argument("--image-root", help="folder the dataset's images lie under (default: the JSON's)")
    s.add_argument("--requests", type=int, default=500, help="requests per scenario (default: %(default)s)")
    s.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default: %(default)s)")
    s.add_argument("--k", type=int, default=10, help="results per query (default: %(default)s)")
    s.add_argument("--level", default="fine", choices=("fine", "coarse"), help="(default: %(default)s)")
    s.add_argument("--out", default="bench/results/serve_load.json", help="results JSON (default: %(default)s)")
    s.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import random
    from pathlib import Path

    from hivlp.bench.serve import format_rows, serve_load_bench, write_results
    from hivlp.embeddings.format import load_embeddings

    if args.requests < 1 or args.concurrency < 1 or args.k < 1:
        raise UsageError("--requests, --concurrency and --k must be >= 1")
    captions = [c for c in load_embeddings(args.embeddings, kinds=("text",)).column("caption").to_pylist() if c]
    random.Random(0).shuffle(captions)
    common = ["--checkpoint", str(args.checkpoint)] + (["--image-root", args.image_root] if args.image_root else [])
    scenarios = {"in-memory": ["--embeddings", str(args.embeddings), *common]}
    if args.uri:
        scenarios["milvus"] = ["--uri", args.uri, "--name", args.name, "--embeddings", str(args.embeddings), *common]
    result = serve_load_bench(scenarios, captions, requests=args.requests, concurrency=args.concurrency,
                              k=args.k, level=args.level)
    result["command"] = "hivlp bench serve " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("embeddings", "uri", "name", "checkpoint", "image_root", "requests", "concurrency", "k", "level", "out")
        and v is not None)
    out = write_results(result, Path(args.out))
    print(format_rows(result))
    print(f"wrote {out}")
    return 0


def register_text(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "text", help="ms per caption through each text tower (single and batched); JSON",
        description="Query-time caption encoding cost of the text towers on real val captions: tokenise + "
                    "forward + mean pooling, one caption per call and in batches, towers interleaved.",
    )
    t.add_argument("--out", default="bench/results/text.json", help="results JSON (default: %(default)s)")
    t.add_argument("--towers", default="package,package-mpnet",
                   help="comma-separated text towers; the first is the baseline of the ratios (default: %(default)s)")
    t.add_argument("--dataset", default=DEFAULT_DATASET, help="Karpathy-format JSON (default: %(default)s)")
    t.add_argument("--split", default="val", help="split the captions come from (default: %(default)s)")
    t.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    t.add_argument("--repeats", type=int, default=50, help="single-caption calls per tower (default: %(default)s)")
    t.add_argument("--batch", type=int, default=64, help="captions per batch (default: %(default)s)")
    t.add_argument("--batches", type=int, default=4, help="batches per tower (default: %(default)s)")
    t.add_argument("--max-tokens", type=int, default=40, help="tokenisation limit (default: %(default)s)")
    t.set_defaults(func=run_text)


def run_text(args: argparse.Namespace) -> int:
    from hivlp.bench.text import TextBenchConfig, format_text_rows, run_text_bench
    from hivlp.data.karpathy import read_pairs
    from hivlp.io import atomic_write_json, check_output_file

    for name in ("threads", "repeats", "batch", "batches", "max_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    towers = tuple(x.strip() for x in args.towers.split(",") if x.strip())
    if not towers:
        raise UsageError("--towers: give at least one text tower")
    check_output_file(args.out, "--out")
    captions = list(read_pairs(args.dataset, None, args.split)["caption"])
    cfg = TextBenchConfig(towers, args.threads, args.repeats, args.batch, args.batches, args.max_tokens)
    result = run_text_bench(captions, cfg)
    result["dataset"] = str(args.dataset)
    atomic_write_json(args.out, result)
    print(format_text_rows(result))
    print(f"written: {args.out}")
    return 0


def register_milvus(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "milvus", help="served coarse-to-fine vs full-dim HNSW on a real Milvus server and on Lite; JSON + PNG",
        description="Start a local Milvus 2.3 server (PyPI `milvus`), build a full-dim HNSW index and 64-d "
                    "coarse-to-fine indexes (HNSW, IVF_FLAT, FLAT coarse collections) at N items, the same on "
                    "Milvus Lite, and time single queries side by side with a breakdown per stage.",
    )
    m.add_argument("--n", type=int, default=100_000, help="gallery size (default: %(default)s)")
    m.add_argument("--queries", type=int, default=300, help="caption queries timed (default: %(default)s)")
    m.add_argument("--shortlists", type=_int_list, default=[50, 100, 200], help="(default: 50,100,200)")
    m.add_argument("--efs", type=_int_list, default=[64, 128, 256], help="HNSW ef values (default: 64,128,256)")
    m.add_argument("--nprobes", type=_int_list, default=[16, 64], help="IVF nprobe values (default: 16,64)")
    m.add_argument("--backends", default="server,lite", help="server, lite or both (default: %(default)s)")
    m.add_argument("--coarse-indexes", default="HNSW,IVF_FLAT,FLAT", help="(default: %(default)s)")
    m.add_argument("--embeddings", metavar="NPZ", help="embeddings .npz (as `hivlp bench retrieval`); "
                   "default: synthetic nested embeddings")
    m.add_argument("--workdir", help="folder for the server's data and the indexes (default: a temporary one)")
    m.add_argument("--server-uri", metavar="URI",
                   help="benchmark this running Milvus server (collections bench_*; MILVUS_TOKEN for auth) "
                        "instead of starting a local one")
    m.add_argument("--out", default="bench/results/milvus_server.json", help="(default: %(default)s)")
    m.set_defaults(func=run_milvus)


def run_milvus(args: argparse.Namespace) -> int:
    import sys

    from hivlp.bench.milvus_server import milvus_server_bench, summary_lines, write

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    coarse = tuple(c.strip().upper() for c in args.coarse_indexes.split(",") if c.strip())
    if not backends or set(backends) - {"server", "lite"}:
        raise UsageError(f"--backends {args.backends}: choose server, lite or both")
    if set(coarse) - {"HNSW", "IVF_FLAT", "FLAT"}:
        raise UsageError(f"--coarse-indexes {args.coarse_indexes}: choose from HNSW, IVF_FLAT, FLAT")
    if args.n < 1000 or args.queries < 1:
        raise UsageError("--n must be >= 1000 and --queries >= 1")
    result = milvus_server_bench(n=args.n, n_queries=args.queries, shortlists=tuple(args.shortlists),
                                 efs=tuple(args.efs), nprobes=tuple(args.nprobes), backends=backends,
                                 coarse_types=coarse, workdir=args.workdir, embeddings=args.embeddings,
                                 on_backend=lambda partial: write(partial, args.out), server_uri=args.server_uri)
    result["command"] = "hivlp bench milvus " + " ".join(sys.argv[3:])
    for line in summary_lines(result):
        print(line)
    for path in write(result, args.out):
        print(f"wrote {path}")
    return 0
