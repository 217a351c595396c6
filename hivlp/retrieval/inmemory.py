"""In-memory search engines: exact full-dim search and coarse-to-fine search over nested embeddings.

All engines share one interface, `SearchEngine.search(queries, k) -> SearchResult`, which the Milvus
dual-collection index (`hivlp.retrieval.milvus`) implements too. Queries and gallery vectors are
full-dim and may be unnormalised; every level is compared as cosine similarity (prefix cut, then
L2 normalisation), so scores are comparable across engines.

Coarse-to-fine: scan all N items with a cheap code of a low-dim prefix, keep a shortlist of K,
re-rank it with the full vectors (optionally through intermediate levels first). The gain comes from
bytes scanned per item; kernels were chosen by measuring them side by side (bench/README.md):

- fp32: the renormalised prefix; one query at a time through FAISS's SIMD inner-product loop
  (faster than OpenBLAS gemv for single queries), batches through BLAS matmuls (4*d bytes/item);
- int8: per-dimension symmetric int8 codes scored by PyTorch's fbgemm/oneDNN int8 GEMM
  (`quantized.linear_dynamic`; numpy int8 matmul and `torch._int_mm` were much slower);
- binary: sign bits of random orthogonal projections of the prefix (SimHash: the Hamming distance
  estimates the angle), the shortlist selected by FAISS's counting top-k (`IndexBinaryFlat` with
  `use_heap=False`, one query per call; bits/8 bytes/item; its heap search slowed as the list grew,
  and `faiss.hammings` + `topk_rows` was 1.5x slower).
- batches of queries (more than `_FAISS_QUERIES`) over a large gallery, whatever the codes: one pass
  over the gallery in blocks of `_SCAN_BLOCK` rows. Each query's threshold comes from a strided sample
  of the gallery; a block's scores above it are kept and the block's scores dropped, so the [Q, N]
  score matrix is never written and each block of codes is read once for the whole batch. The
  shortlist is exactly the full scan's (a query the sample misjudged is rescanned alone).
  Sign bits of the raw coordinates weigh every dimension equally, and nested embeddings put most
  of their variance in the first dimensions, so they shortlist poorly.

Final rankings break ties towards the lower gallery row (the FAISS kernels excepted), so a
shortlist of N gives the exact engine's answer.
"""

from __future__ import annotations

import logging
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hivlp.errors import UsageError

log = logging.getLogger(__name__)

CODES = ("fp32", "int8", "binary")
DEFAULT_COARSE_DIM = 64
# Binary codes: sign bits per prefix dimension (256 bits = 32 bytes/item for a 64-d prefix, half of
# what int8 codes of the same prefix cost).
DEFAULT_BITS_PER_DIM = 4
KERNELS = ("numpy", "faiss")
# Query blocks are sized so one block's score matrix stays under this many float32 scores (128 MB).
_SCORE_BLOCK = 1 << 25
# Gallery rows normalised per step when building an engine (bounds temporary memory).
_ROW_BLOCK = 1 << 16
# Rows up to this length are selected with one vectorised partition per query block.
_SHORT_ROW = 8192
# Shortlisted float32 values gathered per re-rank block (64 MB).
_GATHER_BLOCK = 1 << 24
# A re-rank list of at least 1/_DENSE_SHARE of the gallery is scored by one dense matmul.
_DENSE_SHARE = 8
# Up to this many queries, the fp32 coarse pass scores each alone with FAISS's inner-product loop.
_FAISS_QUERIES = 4
# A search handles its queries in chunks of this many (coarse pass, then re-rank), so its memory does
# not grow with the number of queries.
_QUERY_CHUNK = 256
# Batches of more queries scan the gallery in blocks of this many rows (bench/README.md, "batched
# coarse pass"): a block's [Q, rows] scores are filtered against each query's threshold and dropped,
# so the whole [Q, N] score matrix is never written. int8 codes are packed per block, and fbgemm's
# per-call cost makes smaller blocks slow for single queries (8192 rows: 1.7x the time of 16384).
_SCAN_BLOCK = 16384
# Gallery rows (a strided sample) that set each query's threshold for the blocked scan.
_SAMPLE_ROWS = 16384
# The threshold lets through about this many times the shortlist per query.
_OVERSAMPLE = 1.5
# Candidate pairs the blocked scan holds, per query and shortlist slot, before it compacts them to
# each query's best `shortlist` and raises the thresholds (bounds memory when many scores tie).
_PAIR_BUDGET = 4


@dataclass(frozen=True)
class SearchResult:
    """Top-k per query, best first: gallery ids [Q, k] int64 and cosine scores [Q, k] float32."""

    ids: np.ndarray
    scores: np.ndarray


class SearchEngine(ABC):
    """Anything that answers top-k queries over a gallery of full-dim embeddings."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int = 10) -> SearchResult:
        """Top-k gallery items for one query [D] or a batch [Q, D]; always returns [Q, k] arrays."""


def set_threads(n: int) -> None:
    """Use `n` threads in every kernel the engines call: BLAS (numpy), FAISS and PyTorch.

    Process-wide, as the libraries' own settings are.
    """
    import faiss
    import threadpoolctl
    import torch

    if n < 1:
        raise UsageError(f"threads must be >= 1, got {n}")
    threadpoolctl.threadpool_limits(n)
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)


def l2_normalize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of `x` scaled to unit length, as float32, in blocks (into `out`, which may be `x`).

    Raises UsageError naming the first row that is all zeros or not finite.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise UsageError(f"expected a 2-D [n, dim] array of embeddings, got shape {x.shape}")
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    for a in range(0, len(x), _ROW_BLOCK):
        block = np.asarray(x[a : a + _ROW_BLOCK], dtype=np.float32)
        norms = np.linalg.norm(block, axis=1)
        bad = ~np.isfinite(norms) | (norms == 0)
        if bad.any():
            row = a + int(np.flatnonzero(bad)[0])
            raise UsageError(
                f"embedding row {row} is {'all zeros' if norms[row - a] == 0 else 'not finite'}; "
                "it has no direction to search by (check the encoder output for that item)"
            )
        np.divide(block, norms[:, None], out=out[a : a + _ROW_BLOCK])
    return out


def topk_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of a [Q, N] score matrix: (columns [Q, k], scores [Q, k]), best first.

    Exact, ties towards the lower column. Short rows go through one vectorised partition (rows
    with ties at the k-th score are redone one by one); long rows (one query over a big gallery)
    through `_topk_row`, which avoids partitioning all N scores.
    """
    q, n = scores.shape
    k = min(k, n)
    if n > _SHORT_ROW:
        idx = np.empty((q, k), dtype=np.int64)
        val = np.empty((q, k), dtype=np.float32)
        for i in range(q):
            idx[i], val[i] = _topk_row(scores[i], k)
        return idx, val
    # The k-th largest score of each row; the columns reaching it come out of flatnonzero in
    # ascending order, so the stable sort below sends ties to the lower column.
    kth = np.partition(scores, n - k, axis=1)[:, n - k]
    reach = scores >= kth[:, None]
    flat = np.flatnonzero(reach)
    if len(flat) == q * k:  # no row has scores tied with its k-th: exactly k columns per row
        top = (flat % n).reshape(q, k)
        val = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-val, axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1), np.take_along_axis(val, order, axis=1).astype(np.float32)
    idx = np.empty((q, k), dtype=np.int64)
    val = np.empty((q, k), dtype=np.float32)
    for i in range(q):
        idx[i], val[i] = _topk_row(scores[i], k)
    return idx, val


def _topk_row(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one row. A strided sample of ~4096 scores gives a threshold that about 2k scores
    pass; only those are sorted. If fewer than k pass, the exact k-th score is the threshold."""
    n = len(s)
    if n <= _SHORT_ROW:
        cand = np.arange(n)
    else:
        step = n // 4096
        sample = s[::step]
        m = min(len(sample), int(np.ceil(2 * k / step)) + 8)
        threshold = np.partition(sample, len(sample) - m)[len(sample) - m]
        cand = np.flatnonzero(s >= threshold)
        if len(cand) < k:
            threshold = np.partition(s, n - k)[n - k]
            cand = np.flatnonzero(s >= threshold)
    order = np.argsort(-s[cand], kind="stable")[:k]
    return cand[order], s[cand[order]]


class InMemoryEngine(SearchEngine):
    """Shared parts of the in-memory engines: the normalised full vectors and the id mapping."""

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: Sequence[int] | np.ndarray | None = None,
        normalized: bool = False,
        threads: int | None = None,
    ) -> None:
        if threads is not None:
            set_threads(threads)
        x = np.asarray(embeddings)
        if x.ndim != 2 or len(x) == 0:
            raise UsageError(f"the gallery must be a non-empty 2-D [n, dim] array, got shape {x.shape}")
        if normalized and x.dtype == np.float32 and x.flags.c_contiguous:
            self.full = x  # shared, not copied: a 1M x 512 gallery is 2 GB
        else:
            self.full = l2_normalize(x)
        self.n, self.dim = self.full.shape
        if ids is None:
            self.ids = None
        else:
            self.ids = np.asarray(ids, dtype=np.int64)
            if self.ids.shape != (self.n,):
                raise UsageError(f"ids has shape {self.ids.shape}; expected one id per gallery row ({self.n})")

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        q = q[None, :] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise UsageError(
                f"queries must be [{self.dim}] or [Q, {self.dim}] (the gallery's dim), got shape "
                f"{np.shape(queries)}"
            )
        return l2_normalize(q)

    def _check_k(self, k: int) -> int:
        """k capped at the gallery size (with a warning): results are [Q, k], never larger."""
        if k < 1:
            raise UsageError(f"k must be >= 1, got {k}")
        if k > self.n:
            log.warning("k capped at %d, the gallery size (asked for %d)", self.n, k)
        return min(int(k), self.n)

    def _result(self, rows: np.ndarray, scores: np.ndarray) -> SearchResult:
        ids = rows if self.ids is None else self.ids[rows]
        return SearchResult(ids=ids.astype(np.int64, copy=False), scores=scores.astype(np.float32, copy=False))

    def _query_block(self) -> int:
        return max(1, _SCORE_BLOCK // self.n)

    @property
    @abstractmethod
    def bytes_per_item(self) -> int | float:
        """Bytes a query reads per gallery item in the pass over all N items."""

    def memory_bytes(self) -> int:
        """Bytes the engine holds: the full vectors plus anything a subclass adds."""
        return self.full.nbytes + (0 if self.ids is None else self.ids.nbytes)


class ExactEngine(InMemoryEngine):
    """Brute-force cosine search on the full vectors: the reference every other engine is held to.

    `kernel="numpy"` scores with a BLAS matmul and selects with `topk_rows`; `kernel="faiss"` calls
    `faiss.knn` (the kernel behind `IndexFlatIP.search`) on the same array, without copying it.
    With `normalized=True` a float32 C-contiguous gallery of unit rows is used as is.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: Sequence[int] | np.ndarray | None = None,
        normalized: bool = False,
        kernel: str = "numpy",
        threads: int | None = None,
    ) -> None:
        if kernel not in KERNELS:
            raise UsageError(f"kernel={kernel!r}: choose one of {list(KERNELS)}")
        super().__init__(embeddings, ids, normalized, threads)
        self.kernel = kernel

    @property
    def bytes_per_item(self) -> int:
        """Bytes read per gallery item per query."""
        return 4 * self.dim

    def search(self, queries: np.ndarray, k: int = 10) -> SearchResult:
        q = self._queries(queries)
        k = self._check_k(k)
        if self.kernel == "faiss":
            import faiss

            scores, rows = faiss.knn(q, self.full, k, faiss.METRIC_INNER_PRODUCT)
            return self._result(rows, scores)
        rows = np.empty((len(q), k), dtype=np.int64)
        scores = np.empty((len(q), k), dtype=np.float32)
        step = self._query_block()
        for a in range(0, len(q), step):
            rows[a : a + step], scores[a : a + step] = topk_rows(q[a : a + step] @ self.full.T, k)
        return self._result(rows, scores)


class CoarseToFineEngine(InMemoryEngine):
    """Scan a low-dim code of every item, re-rank a shortlist with the full vectors.

    - `coarse_dim`: prefix length the coarse codes are made from (default 64);
    - `codes`: "fp32" (renormalised prefix), "int8" (per-dimension symmetric scale) or "binary"
      (sign bits of random orthogonal projections, Hamming distance);
    - `bits`: binary code length (default 4 x coarse_dim, a multiple of 8);
    - `shortlist`: candidates kept by the coarse pass (K); K >= N gives exact search;
    - `funnel`: intermediate levels the shortlist passes through before the full vectors, each a
      dim `d` (keeps half of its input list) or a pair `(d, keep)`, e.g. [128, 256] or [(64, 200)]
      (a binary or int8 shortlist re-scored exactly at its own prefix first); never fewer than k;
    - `threads`: sets the process-wide thread count (see `set_threads`).

    int8 codes are made from the prefix minus its gallery mean: the query's dot product with that
    mean is the same for every item, so rankings are unchanged, and the codes spend their range on
    what differs between items. Binary codes are not centred: the Hamming distance then estimates
    the angle to the item itself, which is what the ranking is by.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: Sequence[int] | np.ndarray | None = None,
        coarse_dim: int | None = None,
        codes: str = "fp32",
        shortlist: int = 100,
        funnel: Sequence[int | tuple[int, int]] | None = None,
        threads: int | None = None,
        normalized: bool = False,
        bits: int | None = None,
    ) -> None:
        if codes not in CODES:
            raise UsageError(f"codes={codes!r}: choose one of {list(CODES)}")
        super().__init__(embeddings, ids, normalized, threads)
        self.codes = codes
        self.coarse_dim = int(coarse_dim if coarse_dim is not None else min(DEFAULT_COARSE_DIM, self.dim))
        if not 1 <= self.coarse_dim <= self.dim:
            raise UsageError(f"coarse_dim={self.coarse_dim} must be in [1, {self.dim}] (the embedding dim)")
        self.bits = None
        if codes == "binary":
            self.bits = int(bits if bits is not None else DEFAULT_BITS_PER_DIM * self.coarse_dim)
        if self.bits is not None and (self.bits < 8 or self.bits % 8):
            raise UsageError(f"binary codes need bits to be a positive multiple of 8, got {self.bits}")
        if shortlist < 1:
            raise UsageError(f"shortlist must be >= 1, got {shortlist}")
        self.shortlist = self.param = int(shortlist)
        self.funnel = [_funnel_stage(stage) for stage in (funnel or [])]
        dims = [d for d, _ in self.funnel]
        if any(not 1 <= d < self.dim for d in dims) or dims != sorted(set(dims)):
            raise UsageError(
                f"funnel {funnel}: levels must increase and lie below the full dim ({self.dim})"
            )
        self._build_codes()
        # Each funnel level as contiguous unit rows, so a shortlist's rows are scored by FAISS's
        # gather-and-dot kernel (a strided gather from the full rows cost several times more).
        self._levels = {d: self._unit_prefix(d) for d, _ in self.funnel}

    # ------------------------------------------------------------------ search knob

    param_name = "shortlist"

    def set_param(self, value: int) -> None:
        """Set the shortlist K for the searches that follow: the knob `hivlp.retrieval.ann.tune` raises,
        as it raises nprobe / efSearch on an `AnnEngine`."""
        value = int(value)
        if value < 1:
            raise UsageError(f"shortlist must be >= 1, got {value}")
        self.shortlist = self.param = value

    # ------------------------------------------------------------------ coarse codes

    def _unit_prefix(self, d: int) -> np.ndarray:
        """The renormalised `d`-dim prefix of every item, [N, d] float32 (shared with the fp32 codes
        once they are built)."""
        if self.codes == "fp32" and d == self.coarse_dim and hasattr(self, "_coarse"):
            return self._coarse
        return l2_normalize(self.full[:, :d])

    def _build_codes(self) -> None:
        d = self.coarse_dim
        if self.codes == "fp32":
            self._coarse = self._unit_prefix(d)
            self._sample_codes = _sample_of(self._coarse)
            self._code_bytes = self._coarse.nbytes + _nbytes(self._sample_codes)
            return
        prefix = self._unit_prefix(d)
        if self.codes == "binary":
            import faiss

            self._projection = _orthogonal_projection(d, self.bits)
            # The shortlist is selected by FAISS's counting top-k (IndexBinaryFlat, use_heap=False): one
            # pass over the Hamming distances, no heap; faster than hammings + topk_rows for the same
            # rows (bench/README.md). self._bits is a view of the index's codes.
            self._binary = faiss.IndexBinaryFlat(self.bits)
            self._binary.use_heap = False
            for a in range(0, self.n, _ROW_BLOCK):
                self._binary.add(np.packbits(prefix[a : a + _ROW_BLOCK] @ self._projection > 0, axis=1))
            self._bits = faiss.rev_swig_ptr(self._binary.xb.data(), self.n * self.bits // 8).reshape(self.n, -1)
            self._sample_codes = _sample_of(self._bits)
            self._code_bytes = self._bits.nbytes + _nbytes(self._sample_codes)
            return
        prefix -= prefix.mean(axis=0, dtype=np.float64).astype(np.float32)

        peak = np.abs(prefix).max(axis=0)
        self._scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        q8 = np.empty(prefix.shape, dtype=np.int8)
        for a in range(0, self.n, _ROW_BLOCK):
            block = np.rint(prefix[a : a + _ROW_BLOCK] / self._scale)
            np.clip(block, -127, 127, out=q8[a : a + _ROW_BLOCK], casting="unsafe")
        del prefix
        # Packed in blocks of gallery rows: the blocked scan scores one block at a time, and the
        # whole-gallery scores are the blocks' side by side (the same numbers).
        self._int8_blocks = [(a, _int8_pack(q8[a : a + _SCAN_BLOCK])) for a in range(0, self.n, _SCAN_BLOCK)]
        rows = _sample_rows(self.n)
        self._sample_codes = None if rows is None else _int8_pack(q8[rows])
        del q8
        # fbgemm keeps one int32 column offset per item next to the int8 codes.
        self._code_bytes = (self.n + (0 if rows is None else len(rows))) * (d + 4)

    @property
    def bytes_per_item(self) -> int | float:
        """Bytes the coarse pass reads per gallery item per query (the full vectors are read only
        for the shortlist)."""
        return self._code_bytes / self.n

    def memory_bytes(self) -> int:
        return super().memory_bytes() + self._code_bytes + self._level_bytes()

    def _level_bytes(self) -> int:
        """Bytes of the funnel levels' unit prefixes not shared with the coarse codes."""
        own = getattr(self, "_coarse", None)
        return sum(v.nbytes for v in self._levels.values() if v is not own)

    def _query_codes(self, qc: np.ndarray):
        """Normalised query prefixes [Q, d] in the form the coarse kernels take."""
        if self.codes == "binary":
            return np.packbits(qc @ self._projection > 0, axis=1)
        if self.codes == "int8":
            import torch

            return torch.from_numpy(np.ascontiguousarray(qc * self._scale))
        return qc

    def _block_scores(self, qx, codes) -> np.ndarray:
        """[Q, rows] coarse similarities (higher = closer) of query codes against one block of
        gallery codes: prefix cosines (fp32), scaled int8 dot products, minus Hamming distances."""
        if self.codes == "fp32":
            return _inner_products(qx, codes)
        if self.codes == "binary":
            import faiss

            dist = np.empty((len(qx), len(codes)), dtype=np.int32)
            faiss.hammings(
                faiss.swig_ptr(qx), faiss.swig_ptr(codes), len(qx), len(codes), qx.shape[1], faiss.swig_ptr(dist)
            )
            return np.negative(dist, out=dist)
        import torch

        with warnings.catch_warnings():  # quantized tensors are deprecated upstream; the kernels are not
            warnings.simplefilter("ignore")
            return torch.ops.quantized.linear_dynamic(qx, codes, True).numpy()

    def _scan_blocks(self):
        """(first row, gallery codes) of each block the coarse pass scans."""
        if self.codes == "int8":
            return self._int8_blocks
        codes = self._coarse if self.codes == "fp32" else self._bits
        return [(a, codes[a : a + _SCAN_BLOCK]) for a in range(0, self.n, _SCAN_BLOCK)]

    def _coarse_scores(self, qc: np.ndarray) -> np.ndarray:
        """[Q, N] coarse similarities (higher = closer) for normalised query prefixes [Q, d]."""
        return self._scores_of(self._query_codes(qc))

    def _scores_of(self, qx) -> np.ndarray:
        """[Q, N] coarse similarities for query codes (`_query_codes`)."""
        if self.codes == "fp32":
            return _inner_products(qx, self._coarse)
        if self.codes == "binary":
            return self._block_scores(qx, self._bits)
        blocks = self._int8_blocks
        if len(blocks) == 1:
            return self._block_scores(qx, blocks[0][1])
        out = np.empty((len(qx), self.n), dtype=np.float32)
        for a, codes in blocks:
            block = self._block_scores(qx, codes)
            out[:, a : a + block.shape[1]] = block
        return out

    def _coarse_candidates(self, q: np.ndarray, shortlist: int) -> np.ndarray:
        qc = l2_normalize(q[:, : self.coarse_dim])
        if len(q) > _FAISS_QUERIES and shortlist * _DENSE_SHARE <= self.n and self._sample_codes is not None:
            return self._blocked_candidates(qc, shortlist)
        cand = np.empty((len(q), shortlist), dtype=np.int64)
        if self.codes == "binary":  # one query per call: the counting kernel is faster than a block scan
            codes = self._query_codes(qc)
            for i in range(len(q)):
                cand[i] = self._binary.search(codes[i : i + 1], shortlist)[1][0]
            return cand
        step = self._query_block()
        for a in range(0, len(q), step):
            cand[a : a + step], _ = topk_rows(self._coarse_scores(qc[a : a + step]), shortlist)
        return cand

    def _blocked_candidates(self, qc: np.ndarray, shortlist: int) -> np.ndarray:
        """The coarse top-`shortlist` of a batch of queries [Q, d], in one blocked pass over the gallery.

        Each query's threshold is the score that about `_OVERSAMPLE` x shortlist items reach in a
        strided sample of the gallery; every block's scores at or above it are kept as (row, query,
        score) and the block's scores are dropped. The shortlist is the best `shortlist` of what was
        kept, ties towards the lower row: exactly the full scan's, whenever at least `shortlist`
        items reached the threshold. A query for which fewer did is scanned again on its own.
        """
        nq = len(qc)
        qx = self._query_codes(qc)
        sample = self._block_scores(qx, self._sample_codes)
        ns = sample.shape[1]
        m = min(ns, int(np.ceil(_OVERSAMPLE * shortlist * ns / self.n)) + 8)
        thr = np.partition(sample, ns - m, axis=1)[:, ns - m]
        del sample
        kept = _Kept(nq, shortlist, thr)
        if self.codes == "fp32":  # [rows, Q] blocks: BLAS runs this shape faster than [Q, rows]
            qt = np.ascontiguousarray(qx.T)
            for a, codes in self._scan_blocks():
                kept.add(a, codes @ qt, rows_first=True)
        else:
            for a, codes in self._scan_blocks():
                kept.add(a, self._block_scores(qx, codes))
        cand, short = kept.best()
        # The sample's threshold was too high for these queries: a full scan of them, in blocks of
        # queries that bound the score matrix.
        step = max(1, self._query_block() - 2)
        for a in range(0, len(short), step):
            part = short[a : a + step]
            cand[part] = topk_rows(self._scores_of(_rows_of(qx, part)), shortlist)[0][: len(part)]
        return cand

    # ------------------------------------------------------------------ search

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        shortlist: int | None = None,
        timings: dict[str, float] | None = None,
    ) -> SearchResult:
        """Top-k by full-dim cosine among the coarse shortlist. `shortlist` overrides the engine's for
        this call (a server answers each request with its own); `timings`, when given, receives the
        milliseconds of the coarse pass and of the re-rank (keys "coarse", "rerank")."""
        t0 = time.perf_counter()
        q = self._queries(queries)
        k = self._check_k(k)
        if shortlist is not None and shortlist < 1:
            raise UsageError(f"shortlist must be >= 1, got {shortlist}")
        asked = shortlist
        shortlist = max(self.shortlist if shortlist is None else int(shortlist), k)
        if shortlist > self.n:
            if asked is not None and asked > self.n:
                log.warning("shortlist capped at %d, the gallery size (asked for %d)", self.n, shortlist)
            shortlist = self.n
        rows = np.empty((len(q), k), dtype=np.int64)
        scores = np.empty((len(q), k), dtype=np.float32)
        step = max(1, _GATHER_BLOCK // (shortlist * self.dim))
        coarse, rerank = time.perf_counter() - t0, 0.0
        # Queries in chunks: what one call holds (shortlists, the coarse pass's kept scores) is bounded
        # by the chunk, not by the number of queries.
        for c in range(0, len(q), _QUERY_CHUNK):
            t1 = time.perf_counter()
            chunk = q[c : c + _QUERY_CHUNK]
            cand = self._coarse_candidates(chunk, shortlist)
            cand.sort(axis=1)  # ascending rows, so the stable sorts below send ties to the lower row
            t2 = time.perf_counter()
            for a in range(0, len(chunk), step):
                b = min(a + step, len(chunk))
                rows[c + a : c + b], scores[c + a : c + b] = self._rerank(chunk[a:b], cand[a:b], k)
            coarse += t2 - t1
            rerank += time.perf_counter() - t2
        if timings is not None:
            timings["coarse"] = 1000 * coarse
            timings["rerank"] = 1000 * rerank
        return self._result(rows, scores)

    def search_coarse(self, queries: np.ndarray, k: int = 10) -> SearchResult:
        """The coarse level alone: top-k by the coarse codes, no re-rank. With fp32 codes the scores
        are cosines of the `coarse_dim` prefix; int8 scores are scaled dot products of centred codes
        and binary scores are minus the Hamming distance (rankings, not cosines)."""
        q = self._queries(queries)
        k = self._check_k(k)
        qc = l2_normalize(q[:, : self.coarse_dim])
        rows = np.empty((len(q), k), dtype=np.int64)
        scores = np.empty((len(q), k), dtype=np.float32)
        step = self._query_block()
        for a in range(0, len(q), step):
            rows[a : a + step], scores[a : a + step] = topk_rows(self._coarse_scores(qc[a : a + step]), k)
        return self._result(rows, scores)

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Funnel levels, then full-dim scores, for a block of queries [b, D] and candidates [b, K]."""
        # topk_rows selects without sorting the whole list, ties towards the lower column (= row,
        # as cand is ascending).
        for d, keep in self.funnel:
            keep = max(k, keep if keep is not None else cand.shape[1] // 2)
            if keep >= cand.shape[1]:
                continue
            best, _ = topk_rows(self._level_scores(q, cand, d), keep)
            cand = np.sort(np.take_along_axis(cand, best, axis=1), axis=1)
        best, scores = topk_rows(self._level_scores(q, cand, self.dim), k)
        return np.take_along_axis(cand, best, axis=1), scores

    def _level_scores(self, q: np.ndarray, cand: np.ndarray, d: int) -> np.ndarray:
        """Cosine scores [b, K] at prefix `d` between queries [b, D] (unit) and their candidates."""
        qd = q if d == self.dim else l2_normalize(q[:, :d])
        rows = self.full if d == self.dim else self._levels[d]
        if cand.shape[1] * _DENSE_SHARE >= self.n:
            # The list covers a large share of the gallery: one matmul beats gathering its rows.
            return np.take_along_axis(qd @ rows.T, cand, axis=1)
        return _gathered_inner_products(qd, rows, cand)


def _inner_products(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[Q, N] = q @ x.T for C-contiguous float32 inputs; a few queries go one by one through
    `faiss.fvec_inner_products_ny`, which streams x faster than BLAS gemv on one query."""
    if len(q) > _FAISS_QUERIES:
        return q @ x.T
    import faiss

    out = np.empty((len(q), len(x)), dtype=np.float32)
    for i in range(len(q)):
        faiss.fvec_inner_products_ny(
            faiss.swig_ptr(out[i]), faiss.swig_ptr(q[i]), faiss.swig_ptr(x), x.shape[1], len(x)
        )
    return out


def _gathered_inner_products(q: np.ndarray, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[b, K] = q[i] . x[rows[i, j]] for queries [b, d] and C-contiguous float32 x [N, d], by FAISS's
    gather-and-dot loop (`fvec_inner_products_by_idx`: no [b, K, d] copy of the rows)."""
    import faiss

    q = np.ascontiguousarray(q, dtype=np.float32)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out = np.empty(rows.shape, dtype=np.float32)
    faiss.fvec_inner_products_by_idx(
        faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(x), faiss.swig_ptr(rows), x.shape[1], len(q), rows.shape[1]
    )
    return out


def _funnel_stage(stage: int | tuple[int, int] | Sequence[int]) -> tuple[int, int | None]:
    """(dim, keep) from `d` or `(d, keep)`; keep None = half of the stage's input list."""
    if isinstance(stage, (int, np.integer)):
        return int(stage), None
    try:
        d, keep = (int(v) for v in stage)
    except (TypeError, ValueError):
        raise UsageError(f"funnel stage {stage!r}: expected a dim or a (dim, keep) pair") from None
    if keep < 1:
        raise UsageError(f"funnel stage {stage!r}: keep must be >= 1")
    return d, keep


def _orthogonal_projection(dim: int, bits: int, seed: int = 0) -> np.ndarray:
    """[dim, bits] stacked random orthogonal blocks: hyperplanes for SimHash codes.

    Orthogonal blocks estimate the angle with less variance than i.i.d. Gaussian hyperplanes
    (the shortlist's agreement with exact search is in bench/results/).
    """
    rng = np.random.default_rng(seed)
    blocks = [np.linalg.qr(rng.standard_normal((dim, dim)))[0] for _ in range(-(-bits // dim))]
    return np.ascontiguousarray(np.concatenate(blocks, axis=1)[:, :bits], dtype=np.float32)



def _sample_rows(n: int) -> np.ndarray | None:
    """Rows of the strided gallery sample that sets the blocked scan's thresholds (None for a gallery
    too small to be scanned in blocks)."""
    if n < 2 * _SCAN_BLOCK:
        return None
    return np.arange(0, n, max(2, n // _SAMPLE_ROWS))


def _rows_of(qx, rows: np.ndarray):
    """Query codes of `rows`, scored as they are within the whole batch. int8 query codes are
    quantised per call from the batch's extremes, so the rows holding the batch's minimum and
    maximum go along (after `rows`) to keep the same scale."""
    if isinstance(qx, np.ndarray):
        return qx[rows]
    flat = qx.reshape(-1)
    ends = [int(flat.argmin()) // qx.shape[1], int(flat.argmax()) // qx.shape[1]]
    return qx[np.concatenate([rows, ends])]


def _sample_of(codes: np.ndarray) -> np.ndarray | None:
    rows = _sample_rows(len(codes))
    return None if rows is None else codes[rows]


def _nbytes(codes: np.ndarray | None) -> int:
    return 0 if codes is None else codes.nbytes


def _int8_pack(q8: np.ndarray):
    """int8 codes [rows, d] packed for fbgemm's dynamic-quantised linear kernel."""
    import torch

    with warnings.catch_warnings():  # quantized tensors are deprecated upstream; the kernels are not
        warnings.simplefilter("ignore")
        weight = torch._make_per_tensor_quantized_tensor(torch.from_numpy(np.ascontiguousarray(q8)), 1.0, 0)
        return torch.ops.quantized.linear_prepack(weight, None)


class _Kept:
    """(row, query, score) triples at or above each query's threshold, gathered block by block.

    When more than `_PAIR_BUDGET` x shortlist triples per query pile up (scores tied at the
    threshold, e.g. duplicate rows), they are compacted to each query's best `shortlist` and the
    thresholds of full queries rise to just above their `shortlist`-th score: a later row with an
    equal score loses the tie to the lower rows already kept.
    """

    def __init__(self, nq: int, shortlist: int, thr: np.ndarray) -> None:
        self.nq, self.k = nq, shortlist
        self.thr = thr.copy()
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.held = 0

    def add(self, first_row: int, scores: np.ndarray, rows_first: bool = False) -> None:
        """Keep the scores of a block of gallery rows starting at `first_row`: [Q, rows], or
        [rows, Q] with `rows_first`."""
        if rows_first:
            hit = np.flatnonzero(scores >= self.thr)
            row, query = np.divmod(hit, scores.shape[1])
        else:
            hit = np.flatnonzero(scores >= self.thr[:, None])
            query, row = np.divmod(hit, scores.shape[1])
        self.parts.append((row + first_row, query, scores.ravel()[hit]))
        self.held += len(hit)
        if self.held > _PAIR_BUDGET * self.k * self.nq:
            self._compact()

    def _keep_best(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Each query's best `shortlist` of the held triples, ties to the lower row: (rows, scores,
        start of each query's run, its length), the runs in query order."""
        rows, query, score = (np.concatenate(p) for p in zip(*self.parts))
        # Within a query the triples are in ascending row order (blocks in order, rows ascending in a
        # block), which the stable grouping keeps.
        order = np.argsort(query.astype(np.int16 if self.nq < 2**15 else np.int64), kind="stable")
        rows, score = rows[order], score[order]
        count = np.bincount(query, minlength=self.nq)
        start = np.cumsum(count) - count
        keep = np.ones(len(rows), dtype=bool)
        for i in np.flatnonzero(count > self.k):
            seg = slice(start[i], start[i] + count[i])
            s = score[seg]
            kth = np.partition(s, len(s) - self.k)[len(s) - self.k]
            mine = s > kth
            tied = np.flatnonzero(s == kth)[: self.k - int(mine.sum())]  # the lowest rows among the ties
            mine[tied] = True
            keep[seg] = mine
        count = np.minimum(count, self.k)
        return rows[keep], score[keep], np.cumsum(count) - count, count

    def _compact(self) -> None:
        rows, score, start, count = self._keep_best()
        query = np.repeat(np.arange(self.nq), count)
        self.parts = [(rows, query, score)]
        self.held = len(rows)
        full = np.flatnonzero(count == self.k)
        # Each full query's k-th score: the least of its run (the runs are not sorted by score).
        kth = score[start[full, None] + np.arange(self.k)].min(axis=1)
        self.thr[full] = (kth + 1) if np.issubdtype(kth.dtype, np.integer) else np.nextafter(kth, np.inf)

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        """([Q, shortlist] rows, queries that kept fewer than shortlist)."""
        cand = np.zeros((self.nq, self.k), dtype=np.int64)
        if not self.parts:
            return cand, np.arange(self.nq)
        rows, _, start, count = self._keep_best()
        full = np.flatnonzero(count == self.k)
        cand[full] = rows[start[full, None] + np.arange(self.k)]
        return cand, np.flatnonzero(count < self.k)
