"""Recall@K against a brute-force argsort reference: uneven caption counts, shuffled captions, ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hivlp.errors import UsageError
from hivlp.retrieval.metrics import RECALL_KEYS, recall_from_embeddings, recall_metrics


def _reference(scores: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    """The ALBEF loop: argsort every row / column, rank = position of the (best) positive."""
    n_img, n_txt = scores.shape
    txt_ranks = [min(np.flatnonzero(t2i[np.argsort(-scores[i])] == i)) for i in range(n_img)]
    img_ranks = [int(np.flatnonzero(np.argsort(-scores[:, t]) == t2i[t])[0]) for t in range(n_txt)]
    out = {}
    for prefix, ranks in (("txt", np.array(txt_ranks)), ("img", np.array(img_ranks))):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * np.mean(ranks < k)
    out["r_mean"] = float(np.mean(list(out.values())))
    return out


def _uneven_problem(seed: int, n_img: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Every image has 1-7 captions, in shuffled order; positives score somewhat higher."""
    rng = np.random.default_rng(seed)
    t2i = rng.permutation(np.repeat(np.arange(n_img), rng.integers(1, 8, n_img)))
    scores = rng.standard_normal((n_img, len(t2i))).astype(np.float32)
    scores[t2i, np.arange(len(t2i))] += 1.2
    return scores, t2i


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_bruteforce_with_uneven_shuffled_captions(seed):
    scores, t2i = _uneven_problem(seed)
    got, want = recall_metrics(scores, t2i), _reference(scores, t2i)
    assert set(got) == set(RECALL_KEYS)
    for key in RECALL_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert 0 < got["r_mean"] < 100  # a non-trivial problem


def test_torch_input_and_chunking_give_the_same_result():
    scores, t2i = _uneven_problem(3)
    base = recall_metrics(scores, t2i)
    assert recall_metrics(torch.from_numpy(scores), torch.from_numpy(t2i)) == base
    assert recall_metrics(torch.from_numpy(scores).half(), t2i) == recall_metrics(
        torch.from_numpy(scores).half().float().numpy(), t2i
    )
    for chunk in (1, 3, 17, 1000):
        assert recall_metrics(scores, t2i, chunk=chunk) == base


def test_perfect_scores_give_100_everywhere():
    rng = np.random.default_rng(4)
    t2i = rng.permutation(np.repeat(np.arange(30), rng.integers(1, 6, 30)))
    scores = np.zeros((30, len(t2i)), dtype=np.float32)
    scores[t2i, np.arange(len(t2i))] = 1.0
    assert all(v == 100.0 for v in recall_metrics(scores, t2i).values())


def test_embeddings_variant_equals_score_matrix_and_never_needs_it_whole():
    rng = np.random.default_rng(5)
    t2i = rng.permutation(np.repeat(np.arange(60), rng.integers(1, 7, 60)))
    img = rng.standard_normal((60, 24)).astype(np.float32) * rng.uniform(0.5, 3, (60, 1)).astype(np.float32)
    txt = img[t2i] + 1.5 * rng.standard_normal((len(t2i), 24)).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    want = recall_metrics(unit(img) @ unit(txt).T, t2i)
    assert 0 < want["r_mean"] < 100
    for chunk in (None, 1, 7, 59):
        assert recall_from_embeddings(img, txt, t2i, chunk=chunk) == pytest.approx(want, abs=1e-9)
    raw = recall_from_embeddings(img, txt, t2i, normalize=False)
    assert raw == pytest.approx(recall_metrics(img @ txt.T, t2i), abs=1e-9)


def test_ties_count_against_the_model_by_default_and_for_it_on_request():
    # A collapsed model: every score equal. It must never look perfect.
    t2i = np.repeat(np.arange(20), 2)
    flat = np.ones((20, 40), dtype=np.float32)
    assert all(v == 0.0 for v in recall_metrics(flat, t2i).values())
    assert all(v == 100.0 for v in recall_metrics(flat, t2i, ties="optimistic").values())
    collapsed = recall_from_embeddings(np.ones((20, 4)), np.ones((40, 4)), t2i)
    assert all(v == 0.0 for v in collapsed.values())

    # Caption 0 (of image 0) ties with caption 1 in image 0's row, and image 1 ties with image 0
    # in caption 0's column: rank 0 when optimistic, 1 when pessimistic.
    scores = np.array([[0.9, 0.9, 0.1], [0.9, 0.3, 0.8]], dtype=np.float32)
    t2i = np.array([0, 1, 1])
    opt, pes = recall_metrics(scores, t2i, ties="optimistic"), recall_metrics(scores, t2i)
    # text ranks: image 0 -> 0 / 1; image 1 (best positive 0.8 < 0.9 of caption 0) -> 1 / 1
    assert (opt["txt_r1"], pes["txt_r1"], pes["txt_r5"]) == (50.0, 0.0, 100.0)
    # image ranks: caption 0 -> 0 / 1; caption 1 -> 1 / 1; caption 2 -> 0 / 0
    assert opt["img_r1"] == pytest.approx(200 / 3) and pes["img_r1"] == pytest.approx(100 / 3)


def test_tie_handling_matches_a_counting_reference_with_many_ties():
    rng = np.random.default_rng(6)
    t2i = rng.permutation(np.repeat(np.arange(25), rng.integers(1, 5, 25)))
    scores = rng.integers(0, 4, (25, len(t2i))).astype(np.float32)  # 4 values: ties everywhere
    pos = scores[t2i, np.arange(len(t2i))]
    for ties in ("optimistic", "pessimistic"):
        txt, img = [], []
        for i in range(25):
            mine = t2i == i
            best = scores[i, mine].max()
            neg = scores[i, ~mine]
            txt.append(np.sum(neg > best) if ties == "optimistic" else np.sum(neg >= best))
        for t in range(len(t2i)):
            others = np.delete(scores[:, t], t2i[t])
            img.append(np.sum(others > pos[t]) if ties == "optimistic" else np.sum(others >= pos[t]))
        got = recall_metrics(scores, t2i, chunk=4, ties=ties)
        for k in (1, 5, 10):
            assert got[f"txt_r{k}"] == pytest.approx(100 * np.mean(np.array(txt) < k))
            assert got[f"img_r{k}"] == pytest.approx(100 * np.mean(np.array(img) < k))


def test_bad_inputs_raise_usage_errors_that_say_what_is_wrong():
    scores = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(UsageError, match="one image index per caption"):
        recall_metrics(scores, [0, 1, 2])
    with pytest.raises(UsageError, match=r"no caption .*image 2"):
        recall_metrics(scores, [0, 1, 1, 0])
    with pytest.raises(UsageError, match=r"text_to_image\[3\] = 7"):
        recall_metrics(scores, [0, 1, 2, 7])
    with pytest.raises(UsageError, match="ties="):
        recall_metrics(scores, [0, 1, 2, 2], ties="random")
    with pytest.raises(UsageError, match="4-d but text embeddings 5-d"):
        recall_from_embeddings(np.ones((3, 4)), np.ones((4, 5)), [0, 1, 2, 2])
