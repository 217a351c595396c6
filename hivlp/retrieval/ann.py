"""Approximate nearest-neighbour peers of the flat engines: FAISS HNSW and IVF-Flat, and a tuner.

`AnnEngine` builds one FAISS index either over the full vectors (`coarse_dim` = the full dim: the
index answers alone, the ANN a user would pick instead of a flat scan) or, hierarchically, over the
renormalised `coarse_dim` prefix (or over the binary SimHash codes of that prefix) and re-ranks the
index's shortlist of `shortlist` items with the full vectors, as `CoarseToFineEngine` does after its
flat coarse pass (this class reuses that re-rank).

`tune` raises the index's search-time knob (`nprobe` for IVF, `efSearch` for HNSW) along a ladder
until the top-10 agreement with exact search on held-out queries reaches a target, and stops at the
first setting that does. `coarse_ceiling` gives, for a flat prefix scan, the agreement a hierarchical
index could reach at best with each shortlist length (the share of the exact top 10 inside the
prefix's top K), which `choose_shortlist` uses to pick K before tuning.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hivlp.errors import UsageError
from hivlp.retrieval.inmemory import (
    CoarseToFineEngine,
    SearchResult,
    _orthogonal_projection,
    l2_normalize,
    topk_rows,
)

ANN_INDEXES = ("hnsw", "ivf")
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 40
# IVF training: k-means on a sample of at most this many points per list (FAISS warns below 39),
# this many iterations (FAISS's default is 25; 10 keeps a 1M x 512-d build near two minutes on one core).
_TRAIN_PER_LIST = 40
_TRAIN_ITERATIONS = 10
# Shortlist lengths `choose_shortlist` tries, shortest first.
SHORTLISTS = (50, 100, 200, 400, 800, 1600)
# The longest flat coarse-to-fine shortlist `tune` tries (a binary-code shortlist at 1M needs thousands).
MAX_TUNED_SHORTLIST = 32768


def default_nlist(n: int) -> int:
    """IVF lists for n items: about 4 sqrt(n) (the usual rule), at least 39 training points per list."""
    return int(max(1, min(round(4 * np.sqrt(n)), n // 39)))


class AnnEngine(CoarseToFineEngine):
    """A FAISS HNSW or IVF-Flat index, full-dim or hierarchical (prefix index + full re-rank).

    - `index`: "hnsw" (IndexHNSWFlat, `m` links per node, `ef_construction`) or "ivf" (IndexIVFFlat
      with `nlist` lists, k-means trained on a sample of at most 40 points per list);
    - `coarse_dim`: None or the full dim = the index over the full vectors, nothing re-ranked;
      smaller = the index over the renormalised prefix, its top `shortlist` re-ranked at full dim;
    - `codes`: "fp32" or "binary" (`bits` sign bits of random orthogonal projections of the prefix,
      as in `CoarseToFineEngine`; IndexBinaryIVF / IndexBinaryHNSW); `funnel` as there;
    - the search knob (`nprobe` / `efSearch`) is `param`, set with `set_param` (defaults: 1 / 16).

    All scores are cosines; ids a search could not fill (an IVF probe with fewer items than asked)
    are -1 with score -inf.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: Sequence[int] | np.ndarray | None = None,
        index: str = "ivf",
        coarse_dim: int | None = None,
        codes: str = "fp32",
        shortlist: int = 100,
        funnel: Sequence[int | tuple[int, int]] | None = None,
        nlist: int | None = None,
        m: int = DEFAULT_HNSW_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        bits: int | None = None,
        normalized: bool = False,
        threads: int | None = None,
        seed: int = 0,
    ) -> None:
        if index not in ANN_INDEXES:
            raise UsageError(f"index={index!r}: choose one of {list(ANN_INDEXES)}")
        if codes not in ("fp32", "binary"):
            raise UsageError(f"codes={codes!r}: an ANN index is built over fp32 or binary codes")
        dim = int(np.shape(embeddings)[-1])
        if nlist is not None and nlist < 1:
            raise UsageError(f"nlist must be >= 1, got {nlist}")
        if m < 2 or ef_construction < 1:
            raise UsageError(f"HNSW needs m >= 2 and ef_construction >= 1, got {m} and {ef_construction}")
        self.index_kind, self.m, self.ef_construction, self.seed = index, int(m), int(ef_construction), seed
        self._nlist_arg = nlist
        self.scanned_per_query: float | None = None
        super().__init__(embeddings, ids, coarse_dim=dim if coarse_dim is None else coarse_dim, codes=codes,
                         shortlist=shortlist, funnel=funnel, threads=threads, normalized=normalized, bits=bits)
        self.param_name = "nprobe" if index == "ivf" else "efSearch"
        self.set_param(1 if index == "ivf" else 16)

    @property
    def hierarchical(self) -> bool:
        """True when the index holds a coarse code and its shortlist is re-ranked at full dim."""
        return self.coarse_dim < self.dim or self.codes == "binary"

    # ------------------------------------------------------------------ build

    def _build_codes(self) -> None:
        import faiss

        d = self.coarse_dim
        if self.codes == "binary":
            self._projection = _orthogonal_projection(d, self.bits)
            x = np.empty((self.n, self.bits // 8), dtype=np.uint8)
            for a in range(0, self.n, 1 << 16):
                block = l2_normalize(self.full[a : a + (1 << 16), :d])
                x[a : a + len(block)] = np.packbits(block @ self._projection > 0, axis=1)
            self._vector_bytes = self.bits // 8
        else:
            x = self.full if d == self.dim else l2_normalize(self.full[:, :d])
            self._vector_bytes = 4 * d
        binary = self.codes == "binary"
        if self.index_kind == "ivf":
            self.nlist = int(min(self._nlist_arg or default_nlist(self.n), self.n))
            if binary:
                self.index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(self.bits), self.bits, self.nlist)
            else:
                self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.cp.seed = self.seed
            self.index.cp.max_points_per_centroid = _TRAIN_PER_LIST
            self.index.cp.niter = _TRAIN_ITERATIONS
            sample = x
            if self.n > _TRAIN_PER_LIST * self.nlist:
                rows = np.sort(np.random.default_rng(self.seed).choice(self.n, _TRAIN_PER_LIST * self.nlist, replace=False))
                sample = np.ascontiguousarray(x[rows])
            self.index.train(sample)
        else:
            self.nlist = None
            if binary:
                self.index = faiss.IndexBinaryHNSW(self.bits, self.m)
            else:
                self.index = faiss.IndexHNSWFlat(d, self.m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = self.ef_construction
        for a in range(0, self.n, 1 << 18):  # in blocks: a strided prefix is never copied whole
            self.index.add(np.ascontiguousarray(x[a : a + (1 << 18)]))
        del x
        self._code_bytes = self._index_bytes()

    def _index_bytes(self) -> int:
        """Bytes the FAISS index holds: codes, ids, centroids or graph links."""
        if self.index_kind == "ivf":
            return self.n * (self._vector_bytes + 8) + self.nlist * self._vector_bytes
        hnsw = self.index.hnsw
        return self.n * self._vector_bytes + 4 * (hnsw.neighbors.size() + hnsw.levels.size()) + 8 * hnsw.offsets.size()

    # ------------------------------------------------------------------ search knob

    def set_param(self, value: int) -> None:
        """Set `nprobe` (IVF, capped at nlist) or `efSearch` (HNSW) for the searches that follow."""
        value = int(value)
        if value < 1:
            raise UsageError(f"{self.param_name} must be >= 1, got {value}")
        if self.index_kind == "ivf":
            value = min(value, self.nlist)
            self.index.nprobe = value
        else:
            self.index.hnsw.efSearch = value
        self.param = value

    @property
    def bytes_per_item(self) -> float:
        """Bytes the index read per gallery item in the last search: distances computed per query
        (FAISS's own counters) x bytes per coded vector / N. Before any search: the code size."""
        if self.scanned_per_query is None:
            return float(self._vector_bytes)
        return self.scanned_per_query * self._vector_bytes / self.n

    def memory_bytes(self) -> int:
        """The index, plus the full vectors when it re-ranks with them (a full-dim index holds its own)."""
        extra = self.full.nbytes + self._level_bytes() if self.hierarchical else 0
        return self._code_bytes + extra + (0 if self.ids is None else self.ids.nbytes)

    # ------------------------------------------------------------------ search

    def _index_search(self, qc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        stats = faiss.cvar.indexIVF_stats if self.index_kind == "ivf" else faiss.cvar.hnsw_stats
        stats.reset()
        if self.codes == "binary":
            qc = np.packbits(qc @ self._projection > 0, axis=1)
        scores, rows = self.index.search(qc, k)
        self.scanned_per_query = stats.ndis / len(qc) if stats.ndis else None
        if self.index_kind == "ivf" and self.scanned_per_query is None:  # counters not kept: expected share
            self.scanned_per_query = self.n * self.param / self.nlist
        return scores, rows

    def _coarse_candidates(self, q: np.ndarray, shortlist: int) -> np.ndarray:
        qc = q if self.coarse_dim == self.dim else l2_normalize(q[:, : self.coarse_dim])
        return self._index_search(qc, shortlist)[1]

    def _level_scores(self, q: np.ndarray, cand: np.ndarray, d: int) -> np.ndarray:
        missing = cand < 0
        if not missing.any():
            return super()._level_scores(q, cand, d)
        s = super()._level_scores(q, np.where(missing, 0, cand), d)
        s[missing] = -np.inf
        return s

    def _result(self, rows: np.ndarray, scores: np.ndarray) -> SearchResult:
        if self.ids is None or (rows >= 0).all():
            return super()._result(rows, scores)
        ids = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)
        return SearchResult(ids=ids.astype(np.int64), scores=np.where(rows >= 0, scores, -np.inf).astype(np.float32))

    def search(self, queries: np.ndarray, k: int = 10, **kwargs) -> SearchResult:
        """Top-k by full-dim cosine: the index's own answer (full-dim), or its shortlist re-ranked."""
        if self.hierarchical:
            return super().search(queries, k, **kwargs)
        q = self._queries(queries)
        k = self._check_k(k)
        scores, rows = self._index_search(q, k)
        return self._result(rows, np.where(rows >= 0, scores, -np.inf))

    def search_coarse(self, queries: np.ndarray, k: int = 10) -> SearchResult:
        """The index's own top-k, no re-rank (scores: prefix cosines, or minus Hamming distances)."""
        q = self._queries(queries)
        k = self._check_k(k)
        qc = q if self.coarse_dim == self.dim else l2_normalize(q[:, : self.coarse_dim])
        scores, rows = self._index_search(qc, k)
        if self.codes == "binary":
            scores = -scores.astype(np.float32)
        return self._result(rows, np.where(rows >= 0, scores, -np.inf))


# ---------------------------------------------------------------------------------- quality


def agreement(rows: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean overlap (0..1) of each query's top k with the exact top k (order ignored; -1 never matches)."""
    a, b = np.asarray(rows)[:, :k], np.asarray(exact)[:, :k]
    if a.shape != b.shape:
        raise UsageError(f"agreement needs results of equal shape, got {a.shape} and {b.shape}")
    hit = (a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)
    return float(hit.any(axis=2).sum(axis=1).mean() / k)


def ladder(start: int, stop: int) -> list[int]:
    """Search-knob values from `start` to `stop`, steps of about 1.5x (1, 2, 3, 4, 6, 8, 12, ...)."""
    if start < 1 or stop < start:
        raise UsageError(f"ladder needs 1 <= start <= stop, got {start}, {stop}")
    values, p = set(), 1
    while p <= stop:
        values.update(v for v in (p, 3 * p // 2) if start <= v <= stop)
        p *= 2
    return sorted(values | {start, stop})


@dataclass
class Tuning:
    """What `tune` found: the first knob value reaching `target`, and every value it tried."""

    param: str
    value: int
    agreement: float
    reached: bool
    target: float
    trace: list[dict[str, float]] = field(default_factory=list)  # value, agree10, ms (per query, batched)


def tune(
    engine: CoarseToFineEngine,
    queries: np.ndarray,
    exact_top: np.ndarray,
    target: float = 0.99,
    values: Sequence[int] | None = None,
    k: int = 10,
) -> Tuning:
    """Raise the engine's knob along `values` (default: `ladder` from the smallest useful value to
    nlist, or to 4096 for HNSW; for a flat `CoarseToFineEngine`, its shortlist from k to
    `MAX_TUNED_SHORTLIST` or N) until the top-k agreement with `exact_top` on `queries` reaches
    `target`; the engine is left at the first value that does (or at the last, `reached` False)."""
    if not 0 < target <= 1:
        raise UsageError(f"target agreement must be in (0, 1], got {target}")
    if values is None:
        if not isinstance(engine, AnnEngine):
            values = ladder(k, max(k, min(MAX_TUNED_SHORTLIST, engine.n)))
        elif engine.index_kind == "ivf":
            values = ladder(1, engine.nlist)
        else:
            low = max(k, engine.shortlist if engine.hierarchical else k)
            values = ladder(low, max(low, 4096))
    trace: list[dict[str, float]] = []
    for v in values:
        engine.set_param(v)
        t = time.perf_counter()
        rows = engine.search(queries, k).ids
        ms = 1000 * (time.perf_counter() - t) / len(queries)
        got = agreement(rows, exact_top, k)
        trace.append({"value": engine.param, "agree10": got, "ms": ms})
        if got >= target:
            return Tuning(engine.param_name, engine.param, got, True, target, trace)
    return Tuning(engine.param_name, engine.param, trace[-1]["agree10"], False, target, trace)


def coarse_ceiling(
    gallery: np.ndarray, queries: np.ndarray, exact_top: np.ndarray, coarse_dim: int,
    shortlists: Sequence[int] = SHORTLISTS, k: int = 10,
) -> dict[int, float]:
    """{K: agreement} of exact prefix search with a shortlist of K re-ranked at full dim, i.e. the
    share of the exact top k inside the prefix's top K: the best a hierarchical index over that
    prefix can reach with that shortlist. `gallery` and `queries` unit-norm full vectors."""
    kmax = min(max(shortlists), len(gallery))
    prefix = l2_normalize(gallery[:, :coarse_dim])
    qc = l2_normalize(queries[:, :coarse_dim])
    pos = np.full(exact_top[:, :k].shape, np.iinfo(np.int64).max)
    step = max(1, (1 << 25) // len(gallery))
    for a in range(0, len(qc), step):
        top, _ = topk_rows(qc[a : a + step] @ prefix.T, kmax)
        for i, row in enumerate(top):
            where = {int(r): j for j, r in enumerate(row)}
            pos[a + i] = [where.get(int(r), pos[a + i, c]) for c, r in enumerate(exact_top[a + i, :k])]
    return {int(s): float((pos < s).mean()) for s in shortlists}


def choose_shortlist(ceiling: dict[int, float], target: float = 0.99, margin: float = 0.005) -> int:
    """The shortest K whose ceiling reaches target + margin (room for the index's own misses), else the longest."""
    for s in sorted(ceiling):
        if ceiling[s] >= min(1.0, target + margin):
            return s
    return max(ceiling)
