"""FAISS ANN peers (`hivlp.retrieval.ann`): agreement with exact search, the tuner, the hierarchical
re-rank. Small random galleries; the whole file runs in seconds."""

from __future__ import annotations

import numpy as np
import pytest

from hivlp.errors import UsageError
from hivlp.retrieval.ann import (
    AnnEngine,
    agreement,
    choose_shortlist,
    coarse_ceiling,
    ladder,
    tune,
)
from hivlp.retrieval.inmemory import CoarseToFineEngine, ExactEngine, l2_normalize


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    scale = (1.0 + np.arange(64)) ** -0.5  # early dimensions carry more, as in nested embeddings
    gallery = l2_normalize((rng.standard_normal((3000, 64)) * scale).astype(np.float32))
    queries = l2_normalize((rng.standard_normal((120, 64)) * scale).astype(np.float32))
    exact = ExactEngine(gallery, normalized=True).search(queries, 10).ids
    return gallery, queries, exact


def test_agreement_is_the_mean_overlap_of_the_top_10():
    exact = np.array([np.arange(10), np.arange(10, 20)])
    rows = exact.copy()
    assert agreement(rows, exact) == 1.0
    rows[0, :3] = [97, 98, 99]  # 7 of 10 kept
    rows[1] = rows[1, ::-1]  # order does not matter
    assert agreement(rows, exact) == pytest.approx(0.85)
    rows[1, 0] = -1  # an unfilled slot never matches
    exact[1, 0] = -1
    assert agreement(rows, exact) == pytest.approx((0.7 + 0.8) / 2)  # row 1 lost 19 and 10


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_full_dim_index_agreement_is_computed_against_exact(data, index):
    gallery, queries, exact = data
    engine = AnnEngine(gallery, index=index, normalized=True, nlist=30)
    engine.set_param(30 if index == "ivf" else 512)  # every list probed / a wide beam: exact answers
    res = engine.search(queries, 10)
    assert agreement(res.ids, exact) >= 0.99
    want = ExactEngine(gallery, normalized=True).search(queries, 10)
    np.testing.assert_allclose(np.sort(res.scores, axis=1), np.sort(want.scores, axis=1), atol=1e-5)
    engine.set_param(1)  # one list of thirty: visibly approximate, and the counter says what it read
    assert agreement(engine.search(queries, 10).ids, exact) < 0.9
    assert 0 < engine.bytes_per_item < 4 * 64


def test_tuner_stops_at_the_first_value_reaching_the_target(data):
    gallery, queries, exact = data
    engine = AnnEngine(gallery, index="ivf", normalized=True, nlist=30)
    values = [1, 2, 4, 8, 16, 30]
    got = tune(engine, queries, exact, target=0.95, values=values)
    tried = [t["value"] for t in got.trace]
    assert got.reached and got.agreement >= 0.95 and got.param == "nprobe"
    assert tried == values[: len(tried)] and tried[-1] == got.value == engine.param
    assert all(t["agree10"] < 0.95 for t in got.trace[:-1]) and all(t["ms"] > 0 for t in got.trace)
    # out of reach: every value tried, reported as not reached, engine left at the last
    never = tune(engine, queries, exact, target=1.0, values=[1, 2])
    assert not never.reached and [t["value"] for t in never.trace] == [1, 2] and engine.param == 2


def test_tuner_raises_a_flat_coarse_to_fine_shortlist_to_the_target(data):
    gallery, queries, exact = data
    engine = CoarseToFineEngine(gallery, coarse_dim=16, codes="binary", bits=64, shortlist=10, normalized=True)
    got = tune(engine, queries, exact, target=0.95)
    assert got.reached and got.param == "shortlist" and got.agreement >= 0.95
    tried = [t["value"] for t in got.trace]
    assert tried == ladder(10, len(gallery))[: len(tried)] and got.value == engine.shortlist == engine.param
    # the first value reaching the target: every shorter list was below it, and the engine answers with it
    assert all(t["agree10"] < 0.95 for t in got.trace[:-1]) and len(tried) > 1
    assert agreement(engine.search(queries, 10).ids, exact) == pytest.approx(got.agreement)
    engine.set_param(tried[-2])
    assert agreement(engine.search(queries, 10).ids, exact) < 0.95
    with pytest.raises(UsageError, match="shortlist must be >= 1"):
        engine.set_param(0)


@pytest.mark.parametrize("codes", ["fp32", "binary"])
def test_hierarchical_rerank_with_a_shortlist_holding_everything_is_exact(data, codes):
    gallery, queries, _ = data
    engine = AnnEngine(gallery, index="ivf", coarse_dim=16, codes=codes, shortlist=len(gallery), nlist=20,
                       normalized=True)
    engine.set_param(20)
    assert engine.hierarchical
    got = engine.search(queries, 10)
    want = ExactEngine(gallery, normalized=True).search(queries, 10)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)


def test_hierarchical_hnsw_reaches_the_target_after_tuning(data):
    gallery, queries, exact = data
    ceiling = coarse_ceiling(gallery, queries, exact, 16, shortlists=(10, 50, 200, 800))
    assert list(ceiling) == [10, 50, 200, 800] and ceiling[10] < ceiling[800] == pytest.approx(1.0, abs=0.01)
    shortlist = choose_shortlist(ceiling, 0.95)
    assert ceiling[shortlist] >= 0.955 and all(ceiling[s] < 0.955 for s in ceiling if s < shortlist)
    engine = AnnEngine(gallery, index="hnsw", coarse_dim=16, shortlist=shortlist, normalized=True)
    got = tune(engine, queries, exact, target=0.95)
    assert got.reached and got.param == "efSearch" and got.value >= shortlist


def test_unfilled_slots_are_minus_one_with_minus_inf():
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((200, 32)).astype(np.float32)
    engine = AnnEngine(gallery, index="ivf", nlist=5, ids=np.arange(200) + 1000)
    res = engine.search(gallery[:4], 150)  # one list of about 40 items cannot fill 150 slots
    missing = res.ids == -1
    assert missing.any() and np.isneginf(res.scores[missing]).all()
    for row, miss in zip(res.ids, missing):
        assert len(set(row[~miss])) == (~miss).sum() and (row[~miss] >= 1000).all()


def test_ladder_and_bad_arguments():
    assert ladder(1, 20) == [1, 2, 3, 4, 6, 8, 12, 16, 20]
    assert ladder(100, 400) == [100, 128, 192, 256, 384, 400]
    gallery = np.eye(40, 8, dtype=np.float32) + 0.1
    with pytest.raises(UsageError, match="index='flat'"):
        AnnEngine(gallery, index="flat")
    with pytest.raises(UsageError, match="codes='int8'"):
        AnnEngine(gallery, codes="int8")
    with pytest.raises(UsageError, match="nprobe must be >= 1"):
        AnnEngine(gallery, nlist=2).set_param(0)
