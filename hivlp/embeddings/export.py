"""`hivlp export`: embed one split's images and captions with a checkpoint into export shards.

The format (ids, shard names, manifest, readers) is `hivlp.embeddings.format`; this module decides
what a shard holds and encodes it through the one checkpoint-to-embeddings path
(`hivlp.model.encode.load_encoder`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hivlp.embeddings.format import (
    ShardRows,
    check_compatible,
    check_shard,
    embeddings_table,
    shard_done,
    shard_lock,
    shard_range,
    write_shard,
)
from hivlp.errors import UsageError
from hivlp.io import check_output_dir, sha256_file

if TYPE_CHECKING:
    from hivlp.data.karpathy import RetrievalSplit

log = logging.getLogger(__name__)


def shard_rows(
    dataset_json: str | Path, split: str, shard: tuple[int, int], image_root: str | Path | None = None,
    allow_outside_root: bool = False,
) -> ShardRows:
    """The images of shard (i, n) of a split and all captions of those images."""
    from hivlp.data.karpathy import load_split

    check_shard(shard)
    return rows_of_shard(load_split(dataset_json, split, image_root, allow_outside_root=allow_outside_root), shard)


def rows_of_shard(sp: RetrievalSplit, shard: tuple[int, int]) -> ShardRows:
    """The images of shard (i, n) of a loaded split and all captions of those images."""
    check_shard(shard)
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
    allow_outside_root: bool = False,
) -> Path:
    """Embed shard `shard` of a split's images and captions; return the shard's Parquet path.

    Re-running a finished shard (same checkpoint weights, dataset file, split and image files; file
    checksum intact) returns at once without loading the model; an image replaced in place makes it
    stale, and it is exported again. Every input is checked before encoding: the checkpoint, the
    dataset (reader rules), `out_dir` (a folder, or creatable; not holding another export). A second
    process exporting the same shard waits for the first and then finds it done. `batch_size` is the
    image batch; captions use the text encoder's default batch. `device` "auto" picks CUDA when available.
    """
    from hivlp.data.images import files_fingerprint
    from hivlp.data.karpathy import load_split
    from hivlp.model.checkpoint import checkpoint_sha256

    check_shard(shard)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    out = check_output_dir(out_dir, "--out")
    ckpt = Path(checkpoint)
    weights_sha = checkpoint_sha256(ckpt)
    dataset = Path(dataset_json)
    if not dataset.is_file():
        raise UsageError(f"{dataset}: dataset file not found (pass --dataset PATH to a Karpathy-format JSON)")
    split_data = load_split(dataset, split, image_root, allow_outside_root=allow_outside_root)
    source = {
        "checkpoint": str(ckpt.resolve()),
        "weights_sha256": weights_sha,
        "dataset": str(dataset.resolve()),
        "dataset_sha256": sha256_file(dataset),
        "split": split,
        "images_fingerprint": files_fingerprint(split_data.image_paths),
    }
    if out.is_dir():
        check_compatible(out, shard, source)  # fail before waiting on, or encoding for, a foreign folder
    with shard_lock(out, shard):
        done = shard_done(out, shard, source)
        if done is not None:
            log.info("%s is already exported from this checkpoint and these images; nothing to do", done)
            return done
        check_compatible(out, shard, source)
        from hivlp.model.encode import load_encoder

        rows = rows_of_shard(split_data, shard)
        encoder = load_encoder(ckpt, device=device)
        log.info(
            "exporting shard %d/%d of %s/%s: %d images, %d captions",
            *shard, dataset.name, split, len(rows.imgids), len(rows.captions),
        )
        img = encoder.images(rows.image_paths, batch_size=batch_size, progress=progress)
        txt = encoder.texts(rows.captions, progress=progress)
        table = embeddings_table(rows, np.asarray(img), np.asarray(txt))
        return write_shard(out, shard, table, source, levels=encoder.levels)
