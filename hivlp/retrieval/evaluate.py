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
from hivlp.retrieval.inmemory import DEFAULT_COARSE_DIM, CoarseToFineEngine
from hivlp.retrieval.metrics import (
    RECALL_KEYS,
    check_text_to_image,
    ranks_from_embeddings,
    recall_from_ranks,
)

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
    img_ranks = first_hit(hits)
    k = min(TOP_K, len(txt))
    captions = CoarseToFineEngine(txt, coarse_dim=coarse_dim, codes=codes, shortlist=shortlist, funnel=funnel)
    hits = t2i[captions.search(img, k).ids] == np.arange(len(img))[:, None]
    txt_ranks = first_hit(hits)
    return txt_ranks, img_ranks


def first_hit(hits: np.ndarray) -> np.ndarray:
    """Per row of a [queries, top-k] hit matrix, the 0-based rank of the first hit, else TOP_K (a rank
    past every R@K reported): the ranks `recall_from_ranks` takes, from any engine's top-k ids."""
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


def evaluate_milvus(
    img_emb: np.ndarray,
    txt_emb: np.ndarray,
    text_to_image: np.ndarray,
    uri: str | None = None,
    name: str | None = None,
    coarse_dim: int = 64,
    shortlist: int = 100,
    index: str = "HNSW",
    token: str | None = None,
) -> dict[str, float]:
    """Karpathy R@1/5/10 both ways (percent, `hivlp.retrieval.metrics`) and r_mean, every search
    going through Milvus (pymilvus is imported here); a positive outside the top 10 misses at every K.

    Builds a temporary index `<name>_eval` (coarse + fine) from the arrays at `uri`, so an index
    being served under `name` is left alone; the temporary collections are dropped afterwards.
    Image ids are row indices, text ids `TEXT_ID_OFFSET + row` (as in exports).
    """
    from hivlp.embeddings.format import TEXT_ID_OFFSET
    from hivlp.retrieval.milvus import DEFAULT_NAME, DEFAULT_URI, MilvusDualIndex

    img = np.asarray(img_emb, dtype=np.float32)
    txt = np.asarray(txt_emb, dtype=np.float32)
    n_img, n_txt = len(img), len(txt)
    t2i = check_text_to_image(text_to_image, n_img, n_txt)
    ids = np.concatenate([np.arange(n_img), TEXT_ID_OFFSET + np.arange(n_txt)])
    with MilvusDualIndex(uri or DEFAULT_URI, f"{name or DEFAULT_NAME}_eval", token=token) as idx:
        try:
            idx.build_from_arrays(
                np.concatenate([img, txt]), ids, ["image"] * n_img + ["text"] * n_txt,
                coarse_dim=coarse_dim, index=index, progress=False,
            )
            k = TOP_K
            t2i_ids = idx.search(txt, k=k, shortlist=shortlist, kind="image").ids
            i2t_ids = idx.search(img, k=k, shortlist=shortlist, kind="text").ids
        finally:
            idx.drop()
    img_ranks = first_hit(t2i_ids == t2i[:, None])
    owner = np.where(i2t_ids >= TEXT_ID_OFFSET, t2i[np.clip(i2t_ids - TEXT_ID_OFFSET, 0, n_txt - 1)], -1)
    txt_ranks = first_hit(owner == np.arange(n_img)[:, None])
    return recall_from_ranks(txt_ranks, img_ranks)


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset: str | Path,
    split: str = "val",
    image_root: str | Path | None = None,
    shortlist: int = 100,
    coarse_dim: int | None = 64,
    batch_size: int = 64,
    device: str = "auto",
    backend: str = "memory",
    codes: str = "fp32",
    uri: str | None = None,
    name: str | None = None,
    progress: bool = True,
    allow_outside_root: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint, encode one split of a Karpathy JSON and evaluate it (the reader refuses a
    split that validation would flag: duplicate ids or files, empty captions, paths outside the root).

    `backend="milvus"` adds a "milvus_c2f" entry: the same coarse-to-fine protocol run through
    a temporary Milvus dual-collection index at `uri` (see `hivlp.retrieval.milvus`).
    """
    if backend not in BACKENDS:
        raise UsageError(f"backend={backend!r}: choose one of {list(BACKENDS)}")
    from hivlp.data.karpathy import load_split
    from hivlp.model.encode import load_encoder

    data = load_split(dataset, split, image_root, allow_outside_root=allow_outside_root)  # before the model loads
    encoder = load_encoder(checkpoint, device=device)
    t = time.perf_counter()
    img, txt = encoder.split(data, batch_size=batch_size, progress=progress)
    encode_s = time.perf_counter() - t
    metrics = evaluate_embeddings(img, txt, data.text_to_image, encoder.levels, coarse_dim, shortlist, codes)
    metrics["timings"]["encode_s"] = encode_s
    if backend == "milvus":
        t = time.perf_counter()
        cd = metrics["coarse_to_fine"]["coarse_dim"]
        res = evaluate_milvus(img, txt, data.text_to_image, uri, name, coarse_dim=cd, shortlist=shortlist)
        metrics["milvus_c2f"] = {**res, "shortlist": int(shortlist), "coarse_dim": int(cd)}
        metrics["timings"]["milvus_s"] = time.perf_counter() - t
    from hivlp.io import sha256_file

    # What the numbers are bound to: the gate (`hivlp.gate`) refuses metrics of other weights or data.
    metrics["source"] = {
        "checkpoint": str(checkpoint), "weights_sha256": encoder.weights_sha256, "dataset": str(dataset), "split": split,
        "dataset_json_sha256": sha256_file(dataset), "image_root": str(image_root) if image_root else None,
    }
    return metrics


def _table_rows(metrics: dict[str, Any]) -> list[tuple[str, dict]]:
    """The rows of a metrics table, in order: dim_<d> (ascending), full, coarse-to-fine (and Milvus)."""
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
    return rows


def format_table(metrics: dict[str, Any]) -> str:
    """A per-level table: rows dim_<d> (ascending) then full and coarse-to-fine; recall columns."""
    rows = _table_rows(metrics)
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'level':<{width}}  " + " ".join(f"{k:>7}" for k in RECALL_KEYS)]
    for label, m in rows:
        lines.append(f"{label:<{width}}  " + " ".join(f"{m[k]:7.2f}" for k in RECALL_KEYS))
    return "\n".join(lines)


def format_markdown(metrics: dict[str, Any], min_r_mean: float | None = None) -> str:
    """The same per-level R@K table as Markdown (what the Kubeflow run page shows for `evaluate`), with
    where the numbers come from and, given the pipeline's floor `min_r_mean`, the floor's decision."""
    from hivlp.pages import markdown_table

    src = metrics.get("source", {})
    counts = metrics.get("counts", {})
    lines = [
        f"# Evaluation: split `{src.get('split', '?')}`",
        "",
        f"{counts.get('images', '?')} images, {counts.get('texts', '?')} captions; recall in percent "
        "(txt = image-to-text, img = text-to-image; r_mean = AR, the mean of the six).",
        "",
        markdown_table(["level", *RECALL_KEYS], [[label, *(float(m[k]) for k in RECALL_KEYS)]
                                                 for label, m in _table_rows(metrics)]),
        "",
    ]
    if src:
        lines += [f"Checkpoint weights sha256 `{str(src.get('weights_sha256', ''))[:16]}`, "
                  f"dataset `{Path(str(src.get('dataset', ''))).name}`.", ""]
    if min_r_mean is not None and "full" in metrics:
        ar = float(metrics["full"]["r_mean"])
        if ar >= min_r_mean:
            lines.append(f"**Gate: AR {ar:.2f} >= floor {min_r_mean:.2f}: passes the floor; the registry gate "
                         "(promote) decides against the champion.**")
        else:
            lines.append(f"**Gate: AR {ar:.2f} < floor {min_r_mean:.2f}: not promoted (promote, export and "
                         "index are skipped).**")
    return "\n".join(lines) + "\n"
