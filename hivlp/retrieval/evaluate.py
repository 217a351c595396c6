"""Evaluation of a split: Recall@K at every nested level, plus coarse-to-fine search both ways.

`evaluate_embeddings` takes arrays (the training loop calls it every epoch, so it stays around a
second for Flickr8k val); `evaluate_checkpoint` loads a model, encodes a split and calls it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hivlp import DEFAULT_LEVELS
from hivlp.errors import UsageError
from hivlp.retrieval.engine import DEFAULT_COARSE_DIM, CoarseToFineEngine
from hivlp.retrieval.metrics import RECALL_KEYS, check_text_to_image, ranks_from_embeddings, recall_from_ranks

# R@10 is the deepest recall reported, so coarse-to-fine searches return the top 10.
TOP_K = 10
BACKENDS = ("memory", "milvus")


def coarse_to_fine_ranks(
    img: np.ndarray,
    txt: np.ndarray,
    text_to_image: np.ndarray,
    coarse_dim: int | None = 64,
    shortlist: int = 100,
    codes: str = "fp32",
    funnel: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks (as in `ranks_from_embeddings`) from coarse-to-fine searches in both directions.

    Text->image searches the image gallery, image->text the captions. A positive outside the
    returned top 10 gets rank 10 (a miss for every R@K reported).
    """
    t2i = np.asarray(text_to_image, dtype=np.int64)
    k = min(TOP_K, len(img))
    images = CoarseToFineEngine(img, coarse_dim=coarse_dim, codes=codes, shortlist=shortlist, funnel=funnel)
    hits = images.search(txt, k).ids == t2i[:, None]
    img_ranks = _first_hit(hits)
    k = min(TOP_K, len(txt))
    captions = CoarseToFineEngine(txt, coarse_dim=coarse_dim, codes=codes, shortlist=shortlist, funnel=funnel)
    hits = t2i[captions.search(img, k).ids] == np.arange(len(img))[:, None]
    txt_ranks = _first_hit(hits)
    return txt_ranks, img_ranks


def _first_hit(hits: np.ndarray) -> np.ndarray:
    """Per row, the first column that is a hit, else TOP_K."""
    return np.where(hits.any(axis=1), hits.argmax(axis=1), TOP_K)


def evaluate_embeddings(
    img_emb: np.ndarray,
    txt_emb: np.ndarray,
    text_to_image: Any,
    levels: Sequence[int] = DEFAULT_LEVELS,
    coarse_dim: int | None = 64,
    shortlist: int = 100,
    codes: str = "fp32",
) -> dict[str, Any]:
    """Metrics of full-dim embeddings at every level and through the coarse-to-fine engine.

    Returns {"full": {7 metrics}, "dim_<d>": {...} per level, "coarse_to_fine": {7 metrics,
    shortlist, coarse_dim, codes}, "counts": {...}, "timings": {seconds per part}}. Metrics are
    percentages (see `hivlp.retrieval.metrics`). Levels above the embedding dim are an error.
    """
    img = np.asarray(img_emb, dtype=np.float32)
    txt = np.asarray(txt_emb, dtype=np.float32)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise UsageError(f"image {img.shape} and text {txt.shape} embeddings must be [n, D] with the same D")
    dim = img.shape[1]
    t2i = check_text_to_image(text_to_image, len(img), len(txt))
    bad = [d for d in levels if not 1 <= d <= dim]
    if bad:
        raise UsageError(f"levels {bad} do not fit {dim}-d embeddings")
    cd = coarse_dim if coarse_dim is not None else min(DEFAULT_COARSE_DIM, dim)

    out: dict[str, Any] = {}
    timings: dict[str, float] = {}
    t = time.perf_counter()
    out["full"] = recall_from_ranks(*ranks_from_embeddings(img, txt, t2i))
    timings["full_s"] = time.perf_counter() - t
    for d in sorted(set(levels)):
        t = time.perf_counter()
        out[f"dim_{d}"] = dict(out["full"]) if d == dim else recall_from_ranks(
            *ranks_from_embeddings(img[:, :d], txt[:, :d], t2i)
        )
        timings[f"dim_{d}_s"] = time.perf_counter() - t
    t = time.perf_counter()
    c2f = recall_from_ranks(*coarse_to_fine_ranks(img, txt, t2i, cd, shortlist, codes))
    out["coarse_to_fine"] = {**c2f, "shortlist": int(shortlist), "coarse_dim": int(cd), "codes": codes}
    timings["coarse_to_fine_s"] = time.perf_counter() - t
    out["counts"] = {"images": len(img), "texts": len(txt), "dim": dim, "levels": sorted(set(levels))}
    out["timings"] = timings
    return out


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset: str | Path,
    split: str = "val",
    image_root: str | Path | None = None,
    shortlist: int = 100,
    coarse_dim: int | None = 64,
    batch_size: int = 64,
    device: str = "cpu",
    backend: str = "memory",
    codes: str = "fp32",
    uri: str | None = None,
    name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint, encode one split of a Karpathy JSON and evaluate it.

    `backend="milvus"` adds a "milvus_c2f" entry: the same coarse-to-fine protocol run through
    a temporary Milvus dual-collection index at `uri` (see `hivlp.retrieval.milvus`).
    """
    if backend not in BACKENDS:
        raise UsageError(f"backend={backend!r}: choose one of {list(BACKENDS)}")
    from hivlp.data.karpathy import load_split
    from hivlp.model import load_checkpoint
    from hivlp.model.encode import encode_images, encode_texts

    model, _ = load_checkpoint(checkpoint, device=device)
    data = load_split(dataset, split, image_root)
    t = time.perf_counter()
    img = encode_images(model, data.image_paths, batch_size=batch_size, device=device, progress=progress)
    txt = encode_texts(model, data.captions, device=device, progress=progress)
    encode_s = time.perf_counter() - t
    metrics = evaluate_embeddings(img, txt, data.text_to_image, model.levels, coarse_dim, shortlist, codes)
    metrics["timings"]["encode_s"] = encode_s
    if backend == "milvus":
        from hivlp.retrieval import milvus

        t = time.perf_counter()
        kwargs = {k: v for k, v in (("uri", uri), ("name", name)) if v is not None}
        cd = metrics["coarse_to_fine"]["coarse_dim"]
        res = milvus.evaluate_milvus(img, txt, data.text_to_image, coarse_dim=cd, shortlist=shortlist, **kwargs)
        metrics["milvus_c2f"] = {**res, "shortlist": int(shortlist), "coarse_dim": int(cd)}
        metrics["timings"]["milvus_s"] = time.perf_counter() - t
    metrics["source"] = {"checkpoint": str(checkpoint), "dataset": str(dataset), "split": split}
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """A per-level table: rows dim_<d> (ascending) then full and coarse-to-fine; recall columns."""
    rows: list[tuple[str, dict]] = []
    dim = metrics.get("counts", {}).get("dim")
    levels = sorted(int(key[4:]) for key in metrics if key.startswith("dim_"))
    rows += [(f"dim_{d}", metrics[f"dim_{d}"]) for d in levels if d != dim]
    if "full" in metrics:
        rows.append((f"full ({dim})" if dim else "full", metrics["full"]))
    for key, label in (("coarse_to_fine", "c2f"), ("milvus_c2f", "milvus c2f")):
        if key in metrics:
            m = metrics[key]
            detail = f" {m.get('coarse_dim')}->{dim or 'D'} K={m.get('shortlist')}"
            rows.append((label + detail + (f" {m['codes']}" if "codes" in m else ""), m))
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'level':<{width}}  " + " ".join(f"{k:>7}" for k in RECALL_KEYS)]
    for label, m in rows:
        lines.append(f"{label:<{width}}  " + " ".join(f"{m[k]:7.2f}" for k in RECALL_KEYS))
    return "\n".join(lines)
