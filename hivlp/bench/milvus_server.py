"""Served coarse-to-fine vs one full-dim collection, on a real Milvus server and on Milvus Lite.

`hivlp bench milvus` builds, at one URI per backend, a full-dim HNSW index (the baseline a user would
pick: one ANN search of 512-d vectors) and coarse-to-fine indexes over the 64-d prefix (HNSW,
IVF_FLAT and FLAT coarse collections), then times single queries, methods interleaved, and records
where each query's time goes: the coarse ANN call, getting the shortlist's full vectors (the local
memory-mapped store, or fetch-by-id from the fine collection), and the re-rank. A 1,000-row collection
gives the backend's call floor, the least any one search call costs there. Quality: top-10
agreement with exact full-dim search and true-image R@10. Everything goes through the public
`MilvusDualIndex` interface (one search call per query, alias resolution cached).

The gallery is synthetic (`hivlp.bench.retrieval.synthetic_embeddings`: nested structure, early
dimensions carrying the most signal) unless an embeddings .npz is given: its captions are the
queries, its images sit among Gaussian distractors fitted to real (or synthetic) image embeddings.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from hivlp.bench.measure import TOP_K, quality
from hivlp.errors import UsageError

log = logging.getLogger(__name__)
# Rows of the "call floor" collection: small enough that the search itself costs next to nothing, so
# its latency is what one search call costs at the backend (client, gRPC, proxy, query node).
FLOOR_ROWS = 1000


def _percentiles(times: list[float]) -> dict[str, float]:
    return {"ms_p50": float(np.median(times)), "ms_p90": float(np.percentile(times, 90)),
            "ms_mean": float(np.mean(times))}


def _run_configs(configs: list[dict], queries: np.ndarray, true_rows: np.ndarray, exact: np.ndarray,
                 rounds: int = 2) -> list[dict]:
    """Time every config one query at a time, configs interleaved per query (a burst of load from
    other processes hits every config alike). Each config: {"label", "fn": q -> (ids, stages)}."""
    for c in configs:  # warm up: loads, first-touch pages, connections
        for q in queries[:3]:
            c["fn"](q)
    times = {c["label"]: [] for c in configs}
    stages = {c["label"]: [] for c in configs}
    ids = {c["label"]: np.full((len(queries), TOP_K), -1, np.int64) for c in configs}
    for _ in range(rounds):
        for i, q in enumerate(queries):
            for c in configs:
                t = time.perf_counter()
                got, st = c["fn"](q)
                times[c["label"]].append(1000 * (time.perf_counter() - t))
                stages[c["label"]].append(st)
                ids[c["label"]][i] = got[: TOP_K]
    rows = []
    for c in configs:
        st = stages[c["label"]]
        breakdown = {k: float(np.median([s[k] for s in st])) for k in (st[0] if st else {})}
        # The floor searches another (tiny) gallery: its hits say nothing about quality.
        q = {"r1": None, "r10": None, "agree10": None} if c["method"] == "floor" else \
            quality(ids[c["label"]], true_rows, exact)
        rows.append({**{k: v for k, v in c.items() if k != "fn"}, **_percentiles(times[c["label"]]),
                     "stages_ms_p50": breakdown, **q})
    return rows


def _configs_for(backend: str, uri: str, indexes: dict[str, Any], shortlists: list[int],
                 efs: list[int], nprobes: list[int], fetch_index: Any) -> list[dict]:
    out: list[dict] = []
    if "floor" in indexes:  # the cost of any one search call at this backend, whatever the index does
        out.append({"backend": backend, "method": "floor", "coarse_dim": 64, "index": "FLAT",
                    "label": f"{backend} call floor: {FLOOR_ROWS} rows, 64-d FLAT",
                    "fn": lambda q, idx=indexes["floor"]: (idx.search_coarse(q, k=TOP_K).ids[0], {})})

    def full_fn(idx, ef):
        def fn(q):
            return idx.search_coarse(q, k=TOP_K, ef=ef).ids[0], {}
        return fn

    def c2f_fn(idx, shortlist, ef):
        def fn(q):
            st: dict[str, float] = {}
            return idx.search(q, k=TOP_K, shortlist=shortlist, ef=ef, timings=st).ids[0], st
        return fn

    for ef in efs:
        out.append({"backend": backend, "method": "full_hnsw", "coarse_dim": 512, "index": "HNSW", "ef": ef,
                    "label": f"{backend} full HNSW ef={ef}", "fn": full_fn(indexes["full"], ef)})
    for itype in ("HNSW", "IVF_FLAT", "FLAT"):
        idx = indexes.get(f"c2f_{itype}")
        if idx is None:
            continue
        knobs = efs if itype == "HNSW" else nprobes if itype == "IVF_FLAT" else [None]
        for shortlist in shortlists:
            for knob in knobs:
                if itype == "HNSW" and knob < shortlist:
                    continue
                out.append({"backend": backend, "method": "c2f", "coarse_dim": 64, "index": itype,
                            "shortlist": shortlist, "ef": knob if itype == "HNSW" else None,
                            "nprobe": knob if itype == "IVF_FLAT" else None, "vectors": "local store",
                            "label": f"{backend} c2f 64-d {itype} K={shortlist} {knob or ''} store",
                            "fn": c2f_fn(idx, shortlist, knob)})
    if fetch_index is not None:  # the same coarse index, full vectors fetched by id from the fine collection
        shortlist = shortlists[len(shortlists) // 2]
        out.append({"backend": backend, "method": "c2f", "coarse_dim": 64, "index": "HNSW", "shortlist": shortlist,
                    "ef": max(efs[0], shortlist), "vectors": "fetch by id",
                    "label": f"{backend} c2f 64-d HNSW K={shortlist} fetch",
                    "fn": c2f_fn(fetch_index, shortlist, max(efs[0], shortlist))})
    return out


def milvus_server_bench(
    n: int = 100_000,
    n_queries: int = 300,
    shortlists: tuple[int, ...] = (50, 100, 200),
    efs: tuple[int, ...] = (64, 128, 256),
    nprobes: tuple[int, ...] = (16, 64),
    backends: tuple[str, ...] = ("server", "lite"),
    coarse_types: tuple[str, ...] = ("HNSW", "IVF_FLAT", "FLAT"),
    workdir: str | Path | None = None,
    embeddings: str | Path | None = None,
    seed: int = 0,
    rounds: int = 2,
    on_backend: Any = None,
    server_uri: str | None = None,
) -> dict[str, Any]:
    """Build the indexes at each backend, time them side by side, return the result dict
    (`on_backend(result)` is called after each backend's rows are in). The "server" backend is a
    local standalone server started for the run, or the running server at `server_uri`."""
    from hivlp.bench.retrieval import (
        BenchEmbeddings,
        GaussianDistractors,
        build_gallery,
        synthetic_embeddings,
    )
    from hivlp.retrieval.inmemory import ExactEngine
    from hivlp.retrieval.milvus import MilvusDualIndex
    from hivlp.retrieval.milvus_server import local_server

    emb = BenchEmbeddings.load(embeddings) if embeddings else synthetic_embeddings(seed=seed)
    fit = emb.extra_image if len(emb.extra_image) >= 2 else emb.image
    gallery, rows = build_gallery(emb.image, n, GaussianDistractors(fit), seed=seed)
    rng = np.random.default_rng(seed)
    qsel = np.sort(rng.choice(len(emb.text), size=min(n_queries, len(emb.text)), replace=False))
    queries = emb.text[qsel]
    true_rows = rows[emb.text_to_image[qsel]]
    exact = ExactEngine(gallery, normalized=True).search(queries, TOP_K).ids
    if n < FLOOR_ROWS:
        raise UsageError(f"the gallery ({n}) must hold at least the {FLOOR_ROWS} rows of the call-floor collection")
    ids = np.arange(n, dtype=np.int64)
    result: dict[str, Any] = {
        "n": n, "queries": len(queries), "top_k": TOP_K, "source": emb.source,
        "exact": quality(exact, true_rows, exact), "builds": [], "rows": [],
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                    "load_avg": list(__import__("os").getloadavg())},
    }
    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        for backend in backends:
            if backend == "server":
                uri = server_uri or stack.enter_context(local_server(root / "server"))
            else:
                uri = str(root / "lite" / "bench.db")
            store = root / f"vectors-{backend}"
            indexes: dict[str, Any] = {}
            specs = [("full", 512, "HNSW")] + [(f"c2f_{t}", 64, t) for t in coarse_types]
            for key, cd, itype in specs:
                idx = stack.enter_context(MilvusDualIndex(uri, f"bench_{key.lower()}", store_dir=store))
                t = time.perf_counter()
                summary = idx.build_from_arrays(gallery, ids, ["image"] * n, coarse_dim=cd, index=itype,
                                                batch_size=5000, progress=False)
                build = {"backend": backend, "index": key, "coarse_dim": cd, "type": itype,
                         "build_s": round(time.perf_counter() - t, 1), "insert_s": summary.get("insert_s"),
                         "verify_s": summary.get("verify_s")}
                log.info("built %s", build)
                result["builds"].append(build)
                indexes[key] = idx
            floor = stack.enter_context(MilvusDualIndex(uri, "bench_floor", store_dir=store))
            floor.build_from_arrays(gallery[:FLOOR_ROWS], ids[:FLOOR_ROWS], ["image"] * FLOOR_ROWS, coarse_dim=64,
                                    index="FLAT", batch_size=5000, progress=False)
            indexes["floor"] = floor
            fetch = None
            if "c2f_HNSW" in indexes:  # a second client of the same index without the local store
                fetch = stack.enter_context(MilvusDualIndex(uri, "bench_c2f_hnsw", store_dir=root / "no-store"))
            configs = _configs_for(backend, uri, indexes, list(shortlists), list(efs), list(nprobes), fetch)
            result["rows"] += _run_configs(configs, queries, true_rows, exact, rounds=rounds)
            if on_backend is not None:  # e.g. write what is measured so far
                on_backend(result)
            if backend == "lite":  # Lite holds its .db until the client closes; free it for the next run
                for idx in list(indexes.values()) + ([fetch] if fetch else []):
                    idx.close()
    result["machine"]["load_avg_end"] = list(__import__("os").getloadavg())
    return result


def plot(result: dict[str, Any]) -> Any:
    """Left: p50 latency vs top-10 agreement per config; right: where the time of the chosen
    coarse-to-fine configs goes (coarse ANN call, full vectors, re-rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    markers = {"server": "o", "lite": "s"}
    colors = {"full_hnsw": "tab:red", "HNSW": "tab:blue", "IVF_FLAT": "tab:green", "FLAT": "tab:purple"}
    for r in result["rows"]:
        if r["method"] == "floor":
            a.axvline(r["ms_p50"], color="gray", lw=1, ls=":" if r["backend"] == "lite" else "-")
            continue
        key = "full_hnsw" if r["method"] == "full_hnsw" else r["index"]
        face = "none" if r.get("vectors") == "fetch by id" else colors[key]
        a.scatter(r["ms_p50"], r["agree10"], marker=markers[r["backend"]], edgecolors=colors[key], facecolors=face)
    for key, c in colors.items():
        a.scatter([], [], color=c, label="full-dim HNSW" if key == "full_hnsw" else f"c2f, 64-d {key}")
    for be, m in markers.items():
        a.scatter([], [], marker=m, color="gray", label=be)
    a.scatter([], [], marker="o", facecolors="none", edgecolors="gray", label="c2f, fetch by id")
    a.plot([], [], color="gray", lw=1, label=f"call floor ({FLOOR_ROWS}-row collection)")
    a.set_xscale("log")
    a.set_xlabel("single-query latency p50 (ms, log)")
    a.set_ylabel("top-10 agreement with exact search")
    a.axhline(0.99, color="gray", lw=0.5, ls="--")
    a.legend(fontsize=8)
    a.set_title(f"Milvus at N = {result['n']:,}")
    chosen = [r for r in result["rows"] if r["method"] == "c2f" and r.get("stages_ms_p50")]
    best = {}
    for r in chosen:
        k = (r["backend"], r["index"], r.get("vectors"))
        if r["agree10"] >= 0.99 and (k not in best or r["ms_p50"] < best[k]["ms_p50"]):
            best[k] = r
    labels, parts = [], {"coarse": [], "fetch": [], "score": []}
    for k, r in sorted(best.items()):
        labels.append(f"{k[0]} {k[1]}\n{'store' if k[2] == 'local store' else 'fetch'} K={r['shortlist']}")
        for p in parts:
            parts[p].append(r["stages_ms_p50"].get(p, 0.0))
    bottom = np.zeros(len(labels))
    for p, vals in parts.items():
        b.bar(labels, vals, bottom=bottom, label={"coarse": "coarse ANN call", "fetch": "full vectors",
                                                  "score": "re-rank"}[p])
        bottom += np.asarray(vals)
    b.set_ylabel("ms (medians per stage)")
    b.set_title("where a coarse-to-fine query's time goes (agreement ≥ 0.99)")
    b.tick_params(axis="x", labelsize=7)
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write(result: dict[str, Any], out: str | Path) -> list[Path]:
    from hivlp.bench.retrieval import _save_figure
    from hivlp.io import atomic_write_json

    out = Path(out)
    atomic_write_json(out, result)
    png = out.with_suffix(".png")
    _save_figure(plot(result), png)
    return [out, png]


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for r in sorted(result["rows"], key=lambda r: (r["backend"], r["method"], r["ms_p50"])):
        st = r.get("stages_ms_p50") or {}
        if r["method"] == "floor":
            lines.append(f"{r['label']:<45} p50 {r['ms_p50']:7.2f} ms  (the cost of one search call)")
            continue
        lines.append(f"{r['label']:<45} p50 {r['ms_p50']:7.2f} ms  agree10 {r['agree10']:.3f}  R@10 {r['r10']:5.1f}"
                     + (f"  [coarse {st.get('coarse', 0):.2f} fetch {st.get('fetch', 0):.2f} "
                        f"score {st.get('score', 0):.2f}]" if st else ""))
    return lines
