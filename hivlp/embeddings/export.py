"""`hivlp export`: embed one split's images and captions with a checkpoint into export shards.

The format (ids, shard names, manifest, readers) is `hivlp.embeddings.format`; this module decides
what a shard holds and encodes it through the one checkpoint-to-embeddings path
(`hivlp.model.encode.load_encoder`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from hivlp.embeddings.format import (
    ShardRows,
    check_compatible,
    check_shard,
    embeddings_table,
    shard_done,
    shard_range,
    write_shard,
)
from hivlp.errors import UsageError
from hivlp.io import sha256_file

log = logging.getLogger(__name__)


def shard_rows(
    dataset_json: str | Path, split: str, shard: tuple[int, int], image_root: str | Path | None = None
) -> ShardRows:
    """The images of shard (i, n) of a split and all captions of those images."""
    from hivlp.data.karpathy import load_split

    check_shard(shard)
    sp = load_split(dataset_json, split, image_root)
    start, stop = shard_range(sp.n_images, shard)
    keep = (sp.text_to_image >= start) & (sp.text_to_image < stop)
    t2i = sp.text_to_image[keep]
    return ShardRows(
        imgids=sp.imgids[start:stop],
        filenames=sp.filenames[start:stop],
        image_paths=sp.image_paths[start:stop],
        sentids=[s for s, k in zip(sp.sentids, keep) if k],
        captions=[c for c, k in zip(sp.captions, keep) if k],
        caption_imgids=[sp.imgids[j] for j in t2i],
        caption_filenames=[sp.filenames[j] for j in t2i],
    )


def export_embeddings(
    checkpoint: str | Path,
    dataset_json: str | Path,
    split: str,
    out_dir: str | Path,
    image_root: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Embed shard `shard` of a split's images and captions; return the shard's Parquet path.

    Re-running a finished shard (same checkpoint weights, dataset file and split; file checksum
    intact) returns at once without loading the model. `batch_size` is the image batch; captions
    use the text encoder's default batch. `device` "auto" picks CUDA when available.
    """
    from hivlp.model.checkpoint import checkpoint_sha256

    check_shard(shard)
    out = Path(out_dir)
    ckpt = Path(checkpoint)
    weights_sha = checkpoint_sha256(ckpt)
    dataset = Path(dataset_json)
    if not dataset.is_file():
        raise UsageError(f"{dataset}: dataset file not found (pass --dataset PATH to a Karpathy-format JSON)")
    source = {
        "checkpoint": str(ckpt.resolve()),
        "weights_sha256": weights_sha,
        "dataset": str(dataset.resolve()),
        "dataset_sha256": sha256_file(dataset),
        "split": split,
    }
    if out.is_dir():
        done = shard_done(out, shard, source)
        if done is not None:
            log.info("%s is already exported from this checkpoint; nothing to do", done)
            return done
        check_compatible(out, shard, source)
    from hivlp.model.encode import load_encoder

    rows = shard_rows(dataset, split, shard, image_root)
    encoder = load_encoder(ckpt, device=device)
    log.info(
        "exporting shard %d/%d of %s/%s: %d images, %d captions",
        *shard, dataset.name, split, len(rows.imgids), len(rows.captions),
    )
    img = encoder.images(rows.image_paths, batch_size=batch_size, progress=progress)
    txt = encoder.texts(rows.captions, progress=progress)
    table = embeddings_table(rows, np.asarray(img), np.asarray(txt))
    return write_shard(out, shard, table, source, levels=encoder.levels)
