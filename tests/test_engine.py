"""Search engines: exact search against brute force, coarse-to-fine with a full shortlist equal to
exact search, and quantised coarse codes keeping true-image recall on a structured synthetic set.

The recall test uses `synthetic_embeddings` (documented in hivlp.bench.retrieval): 300 images
from 50 topics with captions = image + noise + a modality offset, signal decaying over dimensions
as nested embeddings do (full-dim AR about 41, like the frozen-tower model). Model embeddings are
not used so the test stays fast and independent of training.
"""

from __future__ import annotations

import numpy as np
import pytest

from hivlp.bench.retrieval import (
    GaussianDistractors,
    build_gallery,
    synthetic_embeddings,
)
from hivlp.errors import UsageError
from hivlp.retrieval import inmemory
from hivlp.retrieval.inmemory import (
    CoarseToFineEngine,
    ExactEngine,
    SearchEngine,
    topk_rows,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def gallery() -> np.ndarray:
    rng = np.random.default_rng(0)
    # Unnormalised, with a decaying spectrum like nested embeddings.
    x = rng.standard_normal((3000, 96)) * (1 + np.arange(96)) ** -0.5 * rng.uniform(0.5, 2, (3000, 1))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def queries(gallery) -> np.ndarray:
    rng = np.random.default_rng(1)
    return (gallery[:40] + 0.3 * rng.standard_normal((40, gallery.shape[1]))).astype(np.float32)


@pytest.mark.parametrize("kernel", ["numpy", "faiss"])
def test_exact_engine_equals_bruteforce(gallery, queries, kernel):
    scores = _unit(queries) @ _unit(gallery).T
    want = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    res = ExactEngine(gallery, kernel=kernel).search(queries, k=10)
    assert res.ids.shape == (40, 10) and res.ids.dtype == np.int64 and res.scores.dtype == np.float32
    np.testing.assert_array_equal(res.ids, want)
    np.testing.assert_allclose(res.scores, np.take_along_axis(scores, want, 1), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"codes": "fp32"},
        {"codes": "int8"},
        {"codes": "binary"},
        {"codes": "binary", "bits": 64, "coarse_dim": 16},
        {"codes": "fp32", "coarse_dim": 16, "funnel": [32, 64]},
        {"codes": "int8", "funnel": [(64, 2000)]},
    ],
)
def test_full_shortlist_equals_exact_search(gallery, queries, kwargs):
    """Shortlist = N: whatever the coarse codes, the answer is exact search's (ids and scores)."""
    ids = np.arange(len(gallery)) * 7 + 100  # custom ids are mapped through
    exact = ExactEngine(gallery, ids=ids).search(queries, k=20)
    engine = CoarseToFineEngine(gallery, ids=ids, shortlist=len(gallery), **kwargs)
    res = engine.search(queries, k=20)
    np.testing.assert_array_equal(res.ids, exact.ids)
    # Same ranking; scores agree to float32 rounding (gathered rows vs one matmul: different BLAS calls).
    np.testing.assert_allclose(res.scores, exact.scores, rtol=0, atol=1e-6)
    one = engine.search(queries[3], k=5)  # a single [D] query gives [1, k]
    np.testing.assert_array_equal(one.ids, exact.ids[3:4, :5])
    assert isinstance(engine, SearchEngine)


def test_per_call_shortlist_timings_and_the_coarse_level_alone(gallery, queries):
    """What a server asks of one engine per request: its own shortlist, stage times, the coarse pass alone."""
    ids = np.arange(len(gallery)) + 5
    engine = CoarseToFineEngine(gallery, ids=ids, coarse_dim=16, shortlist=50)
    timings: dict[str, float] = {}
    got = engine.search(queries, k=10, shortlist=300, timings=timings)
    ref = CoarseToFineEngine(gallery, ids=ids, coarse_dim=16, shortlist=300).search(queries, k=10)
    np.testing.assert_array_equal(got.ids, ref.ids)
    assert set(timings) == {"coarse", "rerank"} and all(v > 0 for v in timings.values())
    assert engine.shortlist == 50  # the per-call shortlist changed nothing shared
    with pytest.raises(UsageError, match="shortlist must be >= 1"):
        engine.search(queries, shortlist=0)
    coarse = engine.search_coarse(queries, k=10)  # == exact search on the 16-d prefix
    prefix = ExactEngine(gallery[:, :16], ids=ids).search(queries[:, :16], k=10)
    np.testing.assert_array_equal(coarse.ids, prefix.ids)
    np.testing.assert_allclose(coarse.scores, prefix.scores, atol=1e-6)
    assert not np.array_equal(coarse.ids, got.ids)  # the re-rank changes the answer


def test_small_shortlist_is_approximate_but_close(gallery, queries):
    exact = ExactEngine(gallery).search(queries, k=10).ids
    for codes in ("fp32", "int8", "binary"):
        res = CoarseToFineEngine(gallery, codes=codes, coarse_dim=32, shortlist=300).search(queries, k=10).ids
        overlap = np.mean([len(np.intersect1d(a, b)) for a, b in zip(res, exact)]) / 10
        assert 0.8 <= overlap <= 1.0, (codes, overlap)


def test_bytes_per_item_and_memory_are_reported_honestly(gallery):
    n, d = gallery.shape
    assert ExactEngine(gallery).bytes_per_item == 4 * d
    fp32 = CoarseToFineEngine(gallery, codes="fp32", coarse_dim=32)
    int8 = CoarseToFineEngine(gallery, codes="int8", coarse_dim=32)
    binary = CoarseToFineEngine(gallery, codes="binary", coarse_dim=32, bits=128)
    assert (fp32.bytes_per_item, int8.bytes_per_item, binary.bytes_per_item) == (128, 36, 16)
    assert CoarseToFineEngine(gallery, codes="binary", coarse_dim=32).bits == 128  # 4 bits per dim
    for e in (fp32, int8, binary):
        assert e.memory_bytes() == gallery.nbytes + n * e.bytes_per_item


def test_normalized_gallery_is_shared_not_copied(gallery):
    unit = np.ascontiguousarray(_unit(gallery), dtype=np.float32)
    assert ExactEngine(unit, normalized=True).full is unit
    assert ExactEngine(gallery).full is not gallery


def test_topk_rows_is_exact_with_ties_to_the_lower_column():
    rng = np.random.default_rng(2)
    for n in (50, 20_000):  # the vectorised path and the sampled-threshold path
        scores = rng.integers(0, 30, (3, n)).astype(np.float32)  # many ties
        idx, val = topk_rows(scores, 25)
        want = np.argsort(-scores, axis=1, kind="stable")[:, :25]
        np.testing.assert_array_equal(idx, want)
        np.testing.assert_array_equal(val, np.take_along_axis(scores, want, 1))


@pytest.fixture
def small_blocks(monkeypatch):
    """The batched coarse pass's block and sample sizes shrunk so a 3,000-row gallery is scanned in blocks."""
    monkeypatch.setattr(inmemory, "_SCAN_BLOCK", 256)
    monkeypatch.setattr(inmemory, "_SAMPLE_ROWS", 512)
    return monkeypatch


def _full_scan_shortlist(engine, queries, shortlist, monkeypatch):
    """The coarse shortlist by the whole-matrix path (the one batches took before the blocked scan)."""
    with monkeypatch.context() as m:
        m.setattr(inmemory, "_FAISS_QUERIES", 10**9)
        return engine._coarse_candidates(engine._queries(queries), shortlist)


@pytest.mark.parametrize("codes", ["fp32", "int8", "binary"])
@pytest.mark.parametrize(
    "case, oversample, budget",
    [("sampled threshold", 1.5, 4), ("compacted when ties pile up", 60.0, 1), ("threshold too high", 0.05, 4)],
)
def test_blocked_batch_pass_gives_the_full_scans_shortlist(gallery, queries, small_blocks, codes, case, oversample, budget):
    """A batch scanned in gallery blocks against sampled thresholds keeps exactly the shortlist of the
    full [Q, N] scan, ties to the lower row included (300 duplicate rows, one query on them); also when
    the held pairs are compacted, and when the threshold lets fewer than the shortlist through."""
    small_blocks.setattr(inmemory, "_OVERSAMPLE", oversample)
    small_blocks.setattr(inmemory, "_PAIR_BUDGET", budget)
    g = gallery.copy()
    g[100:400] = g[100]
    q = queries.copy()
    q[5] = g[100]
    engine = CoarseToFineEngine(g, codes=codes, coarse_dim=32, shortlist=300)
    blocked = engine._coarse_candidates(engine._queries(q), 300)
    assert engine._sample_codes is not None  # the blocked path was the one taken
    full = _full_scan_shortlist(engine, q, 300, small_blocks)
    np.testing.assert_array_equal(np.sort(blocked, axis=1), np.sort(full, axis=1))
    assert set(blocked[5]) == set(range(100, 400))  # the 300 tied duplicates, nothing else


def test_blocked_batch_search_answers_as_one_query_at_a_time(gallery, queries, small_blocks):
    """fp32 and binary: a batch (blocked scan) and the same queries one by one (single-query kernels)
    give the same ids; the batch's score matrix is never [Q, N], and ten times the queries do not take
    ten times the memory (numpy's peak allocation, tracemalloc)."""
    import tracemalloc

    for kwargs in ({"codes": "fp32"}, {"codes": "binary", "funnel": [(64, 100)]}):
        engine = CoarseToFineEngine(gallery, coarse_dim=32, shortlist=300, **kwargs)
        batch = engine.search(queries, k=10)
        single = np.concatenate([engine.search(q, k=10).ids for q in queries])
        np.testing.assert_array_equal(batch.ids, single)
    big = np.repeat(gallery, 8, axis=0)  # 24,000 rows
    engine = CoarseToFineEngine(big, coarse_dim=32, shortlist=100)

    def peak_of(q: np.ndarray) -> int:
        tracemalloc.start()
        engine.search(q, k=10)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    many = np.repeat(queries, 5, axis=0)  # 200 queries: a [Q, N] float32 matrix is 19 MB
    assert peak_of(many) < 200 * len(big) * 4 / 3
    # Ten times the queries (2,000: the inputs and results grow, 1 MB): the peak stays about the same.
    assert peak_of(np.repeat(many, 10, axis=0)) < 1.5 * peak_of(many) + 2_000_000


def test_quantised_codes_keep_true_image_recall_on_structured_embeddings():
    """Bound: at N=10k (300 real images + Gaussian distractors), K=100 (int8) and 1000 -> 100
    (binary, exact re-scoring at 64 dims) keep true-image R@10 within 3 points of exact search and
    within 1 point of fp32 coarse codes; int8 and binary lose at most 1 point to fp32."""
    emb = synthetic_embeddings(n_images=300, n_extra_images=600, seed=0)
    gal, rows = build_gallery(emb.image, 10_000, GaussianDistractors(np.concatenate([emb.image, emb.extra_image])))
    true = rows[emb.text_to_image]

    def r10(engine) -> float:
        return 100 * float(np.mean((engine.search(emb.text, 10).ids == true[:, None]).any(axis=1)))

    exact = r10(ExactEngine(gal, normalized=True))
    fp32 = r10(CoarseToFineEngine(gal, normalized=True, codes="fp32", shortlist=100))
    int8 = r10(CoarseToFineEngine(gal, normalized=True, codes="int8", shortlist=100))
    binary = r10(CoarseToFineEngine(gal, normalized=True, codes="binary", shortlist=1000, funnel=[(64, 100)]))
    assert 20 < exact < 80  # a problem where misses are possible
    for got in (fp32, int8, binary):
        assert got >= exact - 3.0, (exact, fp32, int8, binary)
    assert int8 >= fp32 - 1.0 and binary >= fp32 - 1.0, (fp32, int8, binary)


def test_bad_arguments_raise_usage_errors(gallery):
    with pytest.raises(UsageError, match="codes="):
        CoarseToFineEngine(gallery, codes="pq")
    with pytest.raises(UsageError, match="coarse_dim=200"):
        CoarseToFineEngine(gallery, coarse_dim=200)
    with pytest.raises(UsageError, match="multiple of 8"):
        CoarseToFineEngine(gallery, codes="binary", bits=100)
    with pytest.raises(UsageError, match="funnel"):
        CoarseToFineEngine(gallery, funnel=[80, 70])
    with pytest.raises(UsageError, match=r"\[96\] or \[Q, 96\]"):
        ExactEngine(gallery).search(np.ones(95, dtype=np.float32))
    bad = gallery.copy()
    bad[17] = 0
    with pytest.raises(UsageError, match="row 17 is all zeros"):
        ExactEngine(bad)
    bad[17] = np.nan
    with pytest.raises(UsageError, match="row 17 is not finite"):
        ExactEngine(bad)
