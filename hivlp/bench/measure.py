"""What every row of the retrieval benchmark measures, in-memory and Milvus alike: one statistic per
column (medians of single-query and of per-query batched times; recall and agreement at 10)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from hivlp.retrieval.ann import agreement

TOP_K = 10


def time_single(engines: dict[str, Any], queries: np.ndarray, repeats: int) -> dict[str, list[float]]:
    """ms of one-query searches, methods interleaved query by query, so a burst of load from other
    processes hits every method alike rather than whichever happened to be running."""
    for engine in engines.values():
        engine.search(queries[0], TOP_K)  # warm up: first-touch pages, thread pools
    times: dict[str, list[float]] = {m: [] for m in engines}
    for q in queries[:repeats]:
        for method, engine in engines.items():
            t = time.perf_counter()
            engine.search(q, TOP_K)
            times[method].append(1000 * (time.perf_counter() - t))
    return times


def time_batches(engine: Any, queries: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """(per-query ms, median over batches of `batch` queries; top-k rows of every query)."""
    rows = np.empty((len(queries), TOP_K), dtype=np.int64)
    per_query = []
    for a in range(0, len(queries), batch):
        block = queries[a : a + batch]
        t = time.perf_counter()
        rows[a : a + len(block)] = engine.search(block, TOP_K).ids
        per_query.append(1000 * (time.perf_counter() - t) / len(block))
    return float(np.median(per_query)), rows


def quality(rows: np.ndarray, true_rows: np.ndarray, exact: np.ndarray | None) -> dict[str, float]:
    hit = rows[:, :TOP_K] == true_rows[:, None]
    out = {"r1": float(100 * hit[:, 0].mean()), "r10": float(100 * hit.any(axis=1).mean())}
    if exact is not None:
        out["agree10"] = agreement(rows, exact, TOP_K)
    return out
