"""Recall@K for image-text retrieval, Karpathy/ALBEF/BLIP protocol, in bounded memory.

Text retrieval (image query, `txt_r*`): an image's rank is the best rank among its captions.
Image retrieval (text query, `img_r*`): the rank of the caption's one image. R@K is the percentage
of queries with rank < K (ranks start at 0); `r_mean` (AR) is the mean of the six recalls.

Rank of a positive = number of negatives that score at least as high as it (`ties="pessimistic"`,
the default), so exact ties count against the model: a collapsed model (all embeddings equal)
scores 0, never 100. `ties="optimistic"` counts only negatives scoring strictly higher; the two
differ only when scores tie exactly.

Nothing here builds a full rank or argsort matrix: scores are compared to the positive's score a
block of rows or columns at a time, so COCO 5K (5,000 x 25,000) and larger fit in a few MB.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from hivlp.errors import UsageError

KS = (1, 5, 10)
RECALL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
TIES = ("optimistic", "pessimistic")
# Elements per comparison block: 16M float32 scores = 64 MB, plus a 16 MB boolean mask.
_BLOCK_ELEMENTS = 1 << 24


def recall_from_ranks(txt_ranks: np.ndarray, img_ranks: np.ndarray) -> dict[str, float]:
    """The seven metrics from 0-based ranks: txt_ranks per image, img_ranks per caption."""
    out: dict[str, float] = {}
    for prefix, ranks in (("txt", np.asarray(txt_ranks)), ("img", np.asarray(img_ranks))):
        for k in KS:
            out[f"{prefix}_r{k}"] = float(100.0 * np.mean(ranks < k))
    out["r_mean"] = float(np.mean([out[key] for key in RECALL_KEYS[:-1]]))
    return out


def recall_metrics(
    scores: Any, text_to_image: Any, chunk: int | None = None, ties: str = "pessimistic"
) -> dict[str, float]:
    """R@1/5/10 both ways and r_mean (percent) from a [n_images, n_texts] similarity matrix.

    `scores` is a numpy array or torch tensor (higher = more similar); `text_to_image[t]` is the
    image index of caption t (any number of captions per image, any order). `chunk` is the number
    of image rows compared at once (default: about 16M scores per block).
    """
    s = _to_numpy(scores)
    if s.ndim != 2:
        raise UsageError(f"scores must be a 2-D [n_images, n_texts] matrix, got shape {s.shape}")
    txt_ranks, img_ranks = ranks_from_scores(s, text_to_image, chunk, ties)
    return recall_from_ranks(txt_ranks, img_ranks)


def ranks_from_scores(
    scores: np.ndarray, text_to_image: Any, chunk: int | None = None, ties: str = "pessimistic"
) -> tuple[np.ndarray, np.ndarray]:
    """(rank of each image's best caption [n_images], rank of each caption's image [n_texts])."""
    s = np.asarray(scores)
    n_img, n_txt = s.shape
    t2i = check_text_to_image(text_to_image, n_img, n_txt)
    _check_ties(ties)
    cols = np.arange(n_txt)
    pos = s[t2i, cols]  # each caption's score with its own image
    pos_max, n_at_max = _best_positive(pos, t2i, n_img)
    txt_ranks = np.empty(n_img, dtype=np.int64)
    img_ranks = np.zeros(n_txt, dtype=np.int64)
    for a, b in _blocks(n_img, n_txt, chunk):
        block = s[a:b]
        if ties == "optimistic":
            txt_ranks[a:b] = np.count_nonzero(block > pos_max[a:b, None], axis=1)
            img_ranks += np.count_nonzero(block > pos[None, :], axis=0)
        else:
            txt_ranks[a:b] = np.count_nonzero(block >= pos_max[a:b, None], axis=1) - n_at_max[a:b]
            img_ranks += np.count_nonzero(block >= pos[None, :], axis=0)
    if ties == "pessimistic":
        img_ranks -= 1  # the caption's own image is not a negative
    return txt_ranks, img_ranks


def recall_from_embeddings(
    img: np.ndarray,
    txt: np.ndarray,
    text_to_image: Any,
    chunk: int | None = None,
    normalize: bool = True,
    ties: str = "pessimistic",
) -> dict[str, float]:
    """Like `recall_metrics(img @ txt.T, ...)` without ever holding the full score matrix.

    With `normalize` (default) rows are L2-normalised first, so scores are cosine similarities.
    Scores are computed in blocks twice (image rows for text retrieval, caption rows for image
    retrieval), so each positive is compared with scores from the same matrix product.
    """
    txt_ranks, img_ranks = ranks_from_embeddings(img, txt, text_to_image, chunk, normalize, ties)
    return recall_from_ranks(txt_ranks, img_ranks)


def ranks_from_embeddings(
    img: np.ndarray,
    txt: np.ndarray,
    text_to_image: Any,
    chunk: int | None = None,
    normalize: bool = True,
    ties: str = "pessimistic",
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks as in `ranks_from_scores`, from embeddings, in blocks of `chunk` rows."""
    img = _as_matrix(img, "image embeddings")
    txt = _as_matrix(txt, "text embeddings")
    if img.shape[1] != txt.shape[1]:
        raise UsageError(f"image embeddings are {img.shape[1]}-d but text embeddings {txt.shape[1]}-d")
    n_img, n_txt = len(img), len(txt)
    t2i = check_text_to_image(text_to_image, n_img, n_txt)
    _check_ties(ties)
    if normalize:
        img, txt = _normalized(img), _normalized(txt)

    # Text retrieval: blocks of image rows; each image's captions, grouped by image.
    by_image = np.argsort(t2i, kind="stable")
    starts = np.searchsorted(t2i[by_image], np.arange(n_img + 1))
    txt_ranks = np.empty(n_img, dtype=np.int64)
    for a, b in _blocks(n_img, n_txt, chunk):
        block = img[a:b] @ txt.T
        mine = by_image[starts[a] : starts[b]]
        pos = block[t2i[mine] - a, mine]
        pos_max, n_at_max = _best_positive(pos, t2i[mine] - a, b - a)
        if ties == "optimistic":
            txt_ranks[a:b] = np.count_nonzero(block > pos_max[:, None], axis=1)
        else:
            txt_ranks[a:b] = np.count_nonzero(block >= pos_max[:, None], axis=1) - n_at_max

    # Image retrieval: blocks of caption rows.
    img_ranks = np.empty(n_txt, dtype=np.int64)
    for a, b in _blocks(n_txt, n_img, chunk):
        block = txt[a:b] @ img.T
        pos = block[np.arange(b - a), t2i[a:b]]
        if ties == "optimistic":
            img_ranks[a:b] = np.count_nonzero(block > pos[:, None], axis=1)
        else:
            img_ranks[a:b] = np.count_nonzero(block >= pos[:, None], axis=1) - 1
    return txt_ranks, img_ranks


def check_text_to_image(text_to_image: Any, n_images: int, n_texts: int) -> np.ndarray:
    """`text_to_image` as int64, checked: one entry per caption, in range, every image captioned."""
    t2i = _to_numpy(text_to_image)
    if t2i.ndim != 1 or len(t2i) != n_texts:
        raise UsageError(f"text_to_image has shape {t2i.shape}; expected one image index per caption ({n_texts})")
    if len(t2i) and not np.issubdtype(t2i.dtype, np.integer):
        raise UsageError(f"text_to_image must hold integer image indices, got dtype {t2i.dtype}")
    t2i = t2i.astype(np.int64, copy=False)
    if len(t2i) and (t2i.min() < 0 or t2i.max() >= n_images):
        bad = int(np.flatnonzero((t2i < 0) | (t2i >= n_images))[0])
        raise UsageError(f"text_to_image[{bad}] = {t2i[bad]} is not an image index in [0, {n_images})")
    uncaptioned = np.setdiff1d(np.arange(n_images), t2i)
    if len(uncaptioned):
        raise UsageError(
            f"{len(uncaptioned)} images have no caption (first: image {int(uncaptioned[0])}); text "
            "retrieval needs at least one positive per image, so drop those images from the split"
        )
    return t2i


def _best_positive(pos: np.ndarray, owner: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per owner: the highest positive score and how many positives reach it."""
    best = np.full(n, -np.inf, dtype=np.result_type(pos.dtype, np.float32))
    np.maximum.at(best, owner, pos)
    at_max = np.zeros(n, dtype=np.int64)
    np.add.at(at_max, owner, pos == best[owner])
    return best, at_max


def _blocks(n_rows: int, row_len: int, chunk: int | None) -> Iterator[tuple[int, int]]:
    step = chunk if chunk is not None else max(1, _BLOCK_ELEMENTS // max(row_len, 1))
    if step < 1:
        raise UsageError(f"chunk must be a positive number of rows, got {chunk}")
    for a in range(0, n_rows, step):
        yield a, min(a + step, n_rows)


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise UsageError(f"ties={ties!r}: choose one of {list(TIES)}")


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.element_size() < 4:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _as_matrix(x: Any, what: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.ndim != 2:
        raise UsageError(f"{what} must be a 2-D [n, dim] array, got shape {a.shape}")
    return a.astype(np.float32, copy=False)


def _normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
