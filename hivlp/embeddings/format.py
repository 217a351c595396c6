"""The embedding export format: ids, shard names, manifest, writers and readers.

`hivlp.embeddings.export` writes it (encoding a split with a checkpoint); the Milvus backend and the
in-memory search read it. Layout of an export folder:

    shard-00000-of-00004.parquet   rows of shard 0 (images of the shard, then their captions)
    shard-00000-of-00004.json      manifest part of shard 0: file, rows, sha256, counts, source
    ...
    manifest.json                  the merged view of all parts (rewritten after each shard)

Ids are unique across both kinds so one collection can hold both: an image's id is its `imgid`,
a caption's id is `TEXT_ID_OFFSET + sentid` (the reader, `hivlp.data.karpathy`, guarantees
0 <= imgid < 10^9, unique ids, and caption ids inside int64).

Why per-shard manifest parts: shards run as parallel pipeline tasks, possibly on different
machines over a shared volume. Each task writes only its own part (atomically), so no two writers
ever touch the same file; `read_manifest` merges the parts, and `manifest.json` is a convenience
copy of that merge, rewritten under a file lock. The parts are the source of truth.

Publishing a shard: its Parquet file is written under a temp name unique to the writer, its sha256
taken from those bytes, and then, under the folder's lock, renamed into place together with its
manifest part; so two writers of one shard never leave a file that does not match its part. (The
exporter also holds a per-shard lock while it encodes: a second writer of the same shard waits and
then finds it done.)

Embeddings are the full D-dim vectors, unnormalised: every level is a prefix, normalised when used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hivlp.data.karpathy import TEXT_ID_OFFSET
from hivlp.errors import HivlpError, UsageError
from hivlp.io import atomic_write_json, new_temp_file, publish_file, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "hivlp-embeddings/1"
COLUMNS = ("id", "kind", "imgid", "sentid", "filename", "caption", "embedding")
# What makes two shards parts of one export (the checkpoint and dataset paths are informational):
# the weights, the dataset JSON, the split, and the split's image files (paths, sizes, mtimes), so an
# image replaced in place makes the old shards another export's.
SOURCE_KEYS = ("weights_sha256", "dataset_sha256", "split", "images_fingerprint")
_PART_KEYS = ("shard", "num_shards", "file", "rows", "sha256", "counts", "dim", "levels", "source")
_PART_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.json$")


def text_id(sentid: int | np.ndarray) -> int | np.ndarray:
    """The export id of a caption (images keep their imgid)."""
    return sentid + TEXT_ID_OFFSET


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def parse_shard(spec: str) -> tuple[int, int]:
    """`"2/4"` -> (2, 4): shard 2 (0-based) of 4."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise UsageError(
            f"--shard {spec!r}: expected i/n with 0 <= i < n, e.g. 0/4 for the first of four shards"
        )
    return int(m.group(1)), int(m.group(2))


def check_shard(shard: tuple[int, int]) -> None:
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"shard {i}/{n}: need 0 <= i < n (shards are numbered from 0)")


def shard_range(n_items: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Contiguous, deterministic slice [start, stop) of n_items for shard (i, n); sizes differ by <= 1."""
    i, n = shard
    return n_items * i // n, n_items * (i + 1) // n


@dataclass
class ShardRows:
    """The items of one shard, in row order: images first, then captions."""

    imgids: list[int]
    filenames: list[str]
    image_paths: list[str]
    sentids: list[int]
    captions: list[str]
    caption_imgids: list[int]
    caption_filenames: list[str]


def embeddings_table(rows: ShardRows, image_emb: np.ndarray, text_emb: np.ndarray) -> Any:
    """One pyarrow Table in the export schema (see module docstring for the id scheme)."""
    import pyarrow as pa

    n_img, n_txt = len(rows.imgids), len(rows.sentids)
    if image_emb.shape[0] != n_img or text_emb.shape[0] != n_txt:
        raise HivlpError(
            f"embedding rows do not match the shard: {image_emb.shape[0]} image vectors for {n_img} "
            f"images, {text_emb.shape[0]} text vectors for {n_txt} captions"
        )
    dim = image_emb.shape[1]
    if text_emb.shape[1] != dim:
        raise HivlpError(f"image embeddings are {dim}-d but text embeddings {text_emb.shape[1]}-d")
    emb = np.concatenate([image_emb, text_emb]).astype(np.float32, copy=False)
    sentids = np.asarray(rows.sentids, dtype=np.int64)
    ids = np.concatenate([np.asarray(rows.imgids, dtype=np.int64), text_id(sentids)])
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "kind": pa.array(["image"] * n_img + ["text"] * n_txt, pa.string()),
            "imgid": pa.array(list(rows.imgids) + list(rows.caption_imgids), pa.int64()),
            "sentid": pa.array([None] * n_img + sentids.tolist(), pa.int64()),
            "filename": pa.array(list(rows.filenames) + list(rows.caption_filenames), pa.string()),
            "caption": pa.array([None] * n_img + list(rows.captions), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
        }
    )


def write_shard(
    out_dir: str | Path,
    shard: tuple[int, int],
    table: Any,
    source: dict[str, Any],
    levels: Sequence[int],
) -> Path:
    """Write a shard's Parquet file (temp name, then rename) and then its manifest part.

    `source` says what was embedded (checkpoint, weights_sha256, dataset, dataset_sha256, split);
    a later run compares its identity (`SOURCE_KEYS`) to decide whether the shard is already done.
    """
    import pyarrow.parquet as pq

    check_shard(shard)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_compatible(out, shard, source)
    name = shard_name(*shard)
    final = out / f"{name}.parquet"
    (out / f".{name}.parquet.tmp").unlink(missing_ok=True)  # the fixed temp name of earlier versions
    tmp = new_temp_file(final)  # unique to this writer; an interrupted writer's temp is removed
    try:
        pq.write_table(table, tmp)
        sha = sha256_file(tmp)  # the bytes this writer wrote, before anyone can replace them
        kinds = table.column("kind").to_pylist()
        part = {
            "format": FORMAT,
            "shard": shard[0],
            "num_shards": shard[1],
            "file": final.name,
            "rows": table.num_rows,
            "sha256": sha,
            "counts": {"image": kinds.count("image"), "text": kinds.count("text")},
            "dim": table.schema.field("embedding").type.list_size,
            "levels": [int(x) for x in levels],
            "source": source,
        }
        with _locked(out / ".manifest.lock"):  # the file and its part are published together
            check_compatible(out, shard, source)
            publish_file(tmp, final)
            atomic_write_json(out / f"{name}.json", part)
            atomic_write_json(out / MANIFEST, read_manifest(out))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return final


def _read_parts(out_dir: Path) -> list[dict]:
    parts = []
    for p in sorted(out_dir.glob("shard-*-of-*.json")):
        if not _PART_RE.match(p.name):
            continue
        try:
            part = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise UsageError(
                f"{p}: manifest part is not valid JSON ({type(e).__name__}); delete it and re-export that shard"
            ) from None
        if not isinstance(part, dict) or any(k not in part for k in _PART_KEYS) or not isinstance(part["source"], dict):
            raise UsageError(f"{p}: not a manifest part of a hivlp export; delete it and re-export that shard")
        parts.append(part)
    return parts


def check_compatible(out_dir: Path, shard: tuple[int, int], source: dict) -> None:
    """Refuse to mix shards of different exports (other model, dataset or shard count) in one folder."""
    for part in _read_parts(out_dir):
        if part["shard"] == shard[0] and part["num_shards"] == shard[1]:
            continue  # this shard's own part: rewritten below
        if part["num_shards"] != shard[1] or not _same_source(part["source"], source):
            what = "shard count" if part["num_shards"] != shard[1] else _source_diff(part["source"], source)
            verb = "differ" if "," in what else "differs"
            raise UsageError(
                f"{out_dir} already holds {part['file']} from a different export ({what} {verb}); "
                "use an empty --out folder or delete the old shards first"
            )


def _same_source(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in SOURCE_KEYS)


def _source_diff(a: dict, b: dict) -> str:
    return ", ".join(k for k in SOURCE_KEYS if a.get(k) != b.get(k))


def read_manifest(embeddings_dir: str | Path) -> dict[str, Any]:
    """Merge the manifest parts of an export folder into one manifest.

    Only shards with both a part and a Parquet file count; `complete` is true when all n do.
    """
    d = Path(embeddings_dir)
    if not d.is_dir():
        raise UsageError(f"{d}: embeddings folder not found; run `hivlp export --out {d}` first")
    parts = _read_parts(d)
    if not parts:
        raise UsageError(f"{d}: no exported shards (shard-*-of-*.json); run `hivlp export --out {d}` first")
    n, source, dim, levels = (parts[0][k] for k in ("num_shards", "source", "dim", "levels"))
    for p in parts[1:]:
        if p["num_shards"] != n or not _same_source(p["source"], source) or p["dim"] != dim:
            raise UsageError(
                f"{d}: shards {parts[0]['file']} and {p['file']} come from different exports; "
                "delete the folder and export again"
            )
    parts = sorted((p for p in parts if (d / p["file"]).is_file()), key=lambda p: p["shard"])
    done = {p["shard"] for p in parts}
    counts = {k: sum(p["counts"][k] for p in parts) for k in ("image", "text")}
    return {
        "format": FORMAT,
        **{k: source.get(k) for k in ("checkpoint", "weights_sha256", "dataset", "dataset_sha256", "split",
                                       "images_fingerprint")},
        "dim": dim,
        "levels": levels,
        "id_scheme": {"image": "imgid", "text": f"{TEXT_ID_OFFSET} + sentid"},
        "num_shards": n,
        "complete": len(done) == n,
        "missing_shards": [i for i in range(n) if i not in done],
        "counts": counts,
        "rows": counts["image"] + counts["text"],
        "shards": [
            {k: p[k] for k in ("shard", "file", "rows", "sha256", "counts")} for p in parts
        ],
    }


def manifest_digest(manifest: dict[str, Any]) -> str:
    """One hash of an export's content: the sha256 of its shards' checksums, in shard order (what a Milvus
    index built from the export records as its digest)."""
    return hashlib.sha256("|".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def shard_lock(out_dir: str | Path, shard: tuple[int, int]) -> Iterator[None]:
    """Held by the one process exporting shard (i, n) into `out_dir`; a second one waits for it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f".{shard_name(*shard)}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is exporting shard %d/%d into %s; waiting for it", *shard, out)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shard_done(out_dir: Path, shard: tuple[int, int], source: dict) -> Path | None:
    """The shard's Parquet path if it was already exported from the same source and is intact."""
    name = shard_name(*shard)
    part_path = out_dir / f"{name}.json"
    parquet = out_dir / f"{name}.parquet"
    if not (part_path.is_file() and parquet.is_file()):
        return None
    try:
        part = json.loads(part_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(part, dict) or not isinstance(part.get("source"), dict) or not _same_source(part["source"], source):
        return None
    if sha256_file(parquet) != part.get("sha256"):
        log.warning("%s: checksum differs from its manifest part; exporting the shard again", parquet)
        return None
    return parquet


def gather_shards(shard_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """One export folder from the folders of parallel shard tasks (each holds its own shard files):
    links every `shard-*-of-*` Parquet file and manifest part into `out_dir` (no copy) and returns it.

    Two folders holding the same shard file is an error naming both: that is two exports mixed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: dict[str, Path] = {}
    for d in shard_dirs:
        for f in sorted(Path(d).glob("shard-*-of-*.*")):
            if f.name in seen:
                raise UsageError(f"{f.name} is in both {seen[f.name].parent} and {d}; gather the shards of one export")
            seen[f.name] = f
            os.symlink(f.resolve(), out / f.name)
    if not seen:
        raise UsageError(f"no shard files (shard-*-of-*.parquet) in {[str(d) for d in shard_dirs]}")
    return out


def iter_shard_batches(
    embeddings_dir: str | Path,
    batch_size: int = 4096,
    kinds: Sequence[str] = ("image", "text"),
    verify: bool = True,
) -> Iterator[Any]:
    """Yield pyarrow RecordBatches of a complete export, optionally checking each file's sha256."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    d = Path(embeddings_dir)
    manifest = read_manifest(d)
    if not manifest["complete"]:
        raise UsageError(
            f"{d}: export incomplete, shards {manifest['missing_shards']} of {manifest['num_shards']} "
            "missing; run `hivlp export --shard i/n` for each"
        )
    for entry in manifest["shards"]:
        path = d / entry["file"]
        if verify and sha256_file(path) != entry["sha256"]:
            raise UsageError(f"{path}: checksum differs from its manifest part; re-export shard {entry['shard']}")
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            mask = pc.is_in(batch.column("kind"), value_set=_pa_strings(kinds))
            sel = batch.filter(mask)
            if sel.num_rows:
                yield sel


def _pa_strings(values: Sequence[str]) -> Any:
    import pyarrow as pa

    return pa.array(list(values), pa.string())


def batch_embeddings(batch: Any) -> np.ndarray:
    """The `embedding` column of a RecordBatch/Table as a float32 [rows, D] array."""
    col = batch.column("embedding")
    if hasattr(col, "combine_chunks"):
        col = col.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def load_embeddings(embeddings_dir: str | Path, kinds: Sequence[str] = ("image", "text")) -> Any:
    """A whole export as one pyarrow Table (small exports, evaluation, tests)."""
    import pyarrow as pa

    batches = list(iter_shard_batches(embeddings_dir, kinds=kinds))
    if not batches:
        raise UsageError(f"{embeddings_dir}: no rows of kind {list(kinds)}")
    return pa.Table.from_batches(batches)
