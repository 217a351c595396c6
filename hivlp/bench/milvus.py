"""Milvus rows of the retrieval benchmark: one full-dim collection vs coarse-to-fine, through the public
interface of `hivlp.retrieval.milvus.MilvusDualIndex` only.

The full-dim baseline is a dual index whose coarse prefix is the whole vector (coarse_dim = D),
searched with `search_coarse` (one ANN search, no re-rank); coarse-to-fine is a dual index over the
64-d prefix searched with `search` (ANN shortlist, full vectors by id, re-rank). Timings use the same
statistics as the in-memory rows (`hivlp.bench.measure`): medians of single-query and of per-query
batched times.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from hivlp.bench.measure import TOP_K, quality, time_batches, time_single
from hivlp.retrieval.inmemory import SearchResult


class _FullDim:
    """The baseline as an engine: `search(q, k)` = one ANN search of a full-dim collection."""

    def __init__(self, index: Any) -> None:
        self.index = index

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        return self.index.search_coarse(queries, k=k, kind="image")


class _CoarseToFine:
    def __init__(self, index: Any, shortlist: int) -> None:
        self.index, self.shortlist = index, shortlist

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        return self.index.search(queries, k=k, shortlist=self.shortlist, kind="image")


def milvus_rows(
    gallery: np.ndarray,
    queries: np.ndarray,
    true_rows: np.ndarray,
    exact_top: np.ndarray,
    coarse_dim: int,
    shortlist: int,
    workdir: str | Path,
    repeats: int,
    batch: int,
) -> list[dict[str, Any]]:
    """Rows `milvus_full` and `milvus_c2f` for a normalised gallery (ids = row numbers) in Milvus Lite.

    `exact_top` are the exact full-dim top-10 rows of each query, for `agree10`. Each index lives in
    its own fresh .db under `workdir` (a Lite file serves one client).
    """
    from hivlp.retrieval.milvus import MilvusDualIndex

    n, dim = gallery.shape
    ids = np.arange(n, dtype=np.int64)
    rows = []
    specs = (("milvus_full", dim, lambda idx: _FullDim(idx)), ("milvus_c2f", coarse_dim, lambda idx: _CoarseToFine(idx, shortlist)))
    for method, cd, engine_of in specs:
        with MilvusDualIndex(str(Path(workdir) / f"{method}.db"), method) as index:
            t = time.perf_counter()
            index.build_from_arrays(gallery, ids, ["image"] * n, coarse_dim=cd, index="HNSW", progress=False)
            build_s = time.perf_counter() - t
            engine = engine_of(index)
            single = time_single({method: engine}, queries, repeats)[method]
            ms_batch, top = time_batches(engine, queries, batch)
            rows.append({
                "method": method, "n": n, "ms_single_p50": float(np.median(single)),
                "ms_single_p90": float(np.percentile(single, 90)), "ms_batch_p50": ms_batch,
                "bytes_per_item": 4 * cd, **quality(top, true_rows, exact_top), "build_s": build_s,
                "coarse_dim": cd, "shortlist": shortlist if method == "milvus_c2f" else None, "top_k": TOP_K,
            })
    return rows
