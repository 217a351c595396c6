"""A local, memory-mapped store of one index version's full vectors, for the coarse-to-fine re-rank.

Beside a Milvus index (`hivlp.retrieval.milvus`), `hivlp index` writes the L2-normalised full vectors
of each version it builds into three files under a store folder:

- `<version>.f32`: the vectors, float32, rows in the order they were indexed;
- `<version>.ids.npy`: the id of each row (int64);
- `<version>.json`: dim, rows, the index's content digest and the sha256 of both files.

Files are written under temporary names and published last, the `.json` after the data, so a store
without its `.json` (an interrupted build) is never used. A search maps its shortlist's ids to rows
(binary search over the sorted ids) and reads those rows from the memory map: well under a
millisecond for a shortlist of 100, where fetching the same vectors from Milvus by id costs a
round trip and a query (numbers in README, *Milvus*). The store is a cache of the fine collection:
a searcher without it (another machine, a deleted folder, other content) fetches from Milvus.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from hivlp.errors import HivlpError


class StoreError(HivlpError):
    """A vector store's files disagree with what they should hold."""


def _paths(root: Path, version: str) -> tuple[Path, Path, Path]:
    return root / f"{version}.f32", root / f"{version}.ids.npy", root / f"{version}.json"


class VectorStoreWriter:
    """Appends rows of one version; `finish()` publishes the files and returns the metadata."""

    def __init__(self, root: str | Path, version: str, dim: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.version, self.dim = version, int(dim)
        remove(self.root, version)
        tag = f".tmp-{os.getpid()}"
        self._vec_path, self._ids_path, self._meta_path = _paths(self.root, version)
        self._vec_tmp = self._vec_path.with_name(self._vec_path.name + tag)
        self._ids_tmp = self._ids_path.with_name(self._ids_path.name + tag)
        self._f = open(self._vec_tmp, "wb")
        self._ids: list[np.ndarray] = []
        self._sha = hashlib.sha256()
        self.rows = 0

    def append(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.shape != (len(ids), self.dim):
            raise StoreError(f"store {self.version}: rows of shape {v.shape}, expected ({len(ids)}, {self.dim})")
        b = v.tobytes()
        self._f.write(b)
        self._sha.update(b)
        self._ids.append(np.asarray(ids, dtype=np.int64))
        self.rows += len(ids)

    def finish(self, digest: str) -> dict:
        self._f.close()
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
        with open(self._ids_tmp, "wb") as f:
            np.save(f, ids)
        os.replace(self._vec_tmp, self._vec_path)
        os.replace(self._ids_tmp, self._ids_path)
        meta = {"version": self.version, "dim": self.dim, "rows": self.rows, "digest": digest,
                "sha256": self._sha.hexdigest(), "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()}
        tmp = self._meta_path.with_name(self._meta_path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(meta, sort_keys=True))
        os.replace(tmp, self._meta_path)
        return meta

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()
        for p in (self._vec_tmp, self._ids_tmp):
            p.unlink(missing_ok=True)


class VectorStore:
    """Read side: `get(ids)` returns the full vectors of ids (rows of -1 ids or unknown ids are NaN)."""

    def __init__(self, root: str | Path, version: str, meta: dict) -> None:
        vec_path, ids_path, _ = _paths(Path(root), version)
        self.root, self.version, self.meta = Path(root), version, meta
        self.dim, self.rows = int(meta["dim"]), int(meta["rows"])
        self.vectors = np.memmap(vec_path, dtype=np.float32, mode="r", shape=(self.rows, self.dim)) \
            if self.rows else np.zeros((0, self.dim), np.float32)
        ids = np.load(ids_path, allow_pickle=False)
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]

    @classmethod
    def open(cls, root: str | Path, version: str, digest: str, rows: int, dim: int) -> VectorStore | None:
        """The store of `version` when its files are complete and hold this content, else None."""
        vec_path, ids_path, meta_path = _paths(Path(root), version)
        try:
            meta = json.loads(meta_path.read_text())
            ok = (meta.get("digest") == digest and int(meta["rows"]) == rows and int(meta["dim"]) == dim
                  and vec_path.stat().st_size == 4 * rows * dim and ids_path.is_file())
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return cls(root, version, meta) if ok else None

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (-1 where the store has none)."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self._sorted, ids)
        pos = np.minimum(pos, len(self._sorted) - 1)
        found = self._sorted[pos] == ids if len(self._sorted) else np.zeros(ids.shape, bool)
        return np.where(found, self._order[pos], -1)

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [..., dim] float32, found mask [...]) for an id array of any shape."""
        rows = self.rows_of(ids)
        found = rows >= 0
        out = np.asarray(self.vectors[np.where(found, rows, 0).ravel()]).reshape(*rows.shape, self.dim)
        return out, found

    def verify(self) -> None:
        """Re-read both files and compare their sha256 with the metadata (raises StoreError)."""
        vec_path, ids_path, _ = _paths(self.root, self.version)
        h = hashlib.sha256()
        if self.rows:
            with open(vec_path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
        if h.hexdigest() != self.meta["sha256"]:
            raise StoreError(f"vector store {vec_path}: sha256 differs from what was written")
        ids = self._sorted[np.argsort(self._order, kind="stable")]
        if hashlib.sha256(ids.tobytes()).hexdigest() != self.meta["ids_sha256"]:
            raise StoreError(f"vector store {ids_path}: ids differ from what was written")


def remove(root: str | Path, version: str) -> None:
    """Delete a version's files (missing ones are skipped)."""
    for p in _paths(Path(root), version):
        p.unlink(missing_ok=True)
