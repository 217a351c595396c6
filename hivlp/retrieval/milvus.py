"""Milvus dual-collection index: coarse ANN search on a low-dim prefix, exact re-rank on full vectors.

Two collections share primary keys and display metadata (kind, imgid, sentid, filename, caption):

- `<name>_coarse`: the first `coarse_dim` dims of each embedding, L2-renormalised, under an ANN index
  (HNSW, IVF_FLAT or FLAT; inner product, which equals cosine on unit vectors);
- `<name>_fine`: the full vectors, L2-normalised, fetched by id for the re-rank (FLAT index: Milvus
  only loads indexed collections, and this one is never scanned).

Each collection has partitions `image` and `text`, so a text query searches images only.
Index metadata lives in collection properties (`hivlp.*`): dims, checkpoint weights hash, a digest of
the source rows, the expected row count per kind and `hivlp.complete`, set to "true" only after all
rows are in, flushed, indexed and counted. A build stopped midway leaves "false": searches refuse
the index and the next `hivlp index` run completes it (upserts by id never duplicate rows).

URIs: a path ending in `.db` is a Milvus Lite file (one process at a time); `http://host:19530`
reaches a Milvus server with the same code (token from `MILVUS_TOKEN`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hivlp.errors import HivlpError, UsageError
from hivlp.redact import redact
from hivlp.retrieval.inmemory import SearchEngine, SearchResult, l2_normalize

log = logging.getLogger(__name__)

DEFAULT_URI = "outputs/milvus/hivlp.db"
DEFAULT_NAME = "hivlp"
KINDS = ("image", "text")
INDEX_TYPES = ("HNSW", "IVF_FLAT", "FLAT")
VECTOR = "vector"
META_FIELDS = ["kind", "imgid", "sentid", "filename", "caption"]
CONNECT_TIMEOUT_S = 10.0
MAX_TOPK = 16384  # Milvus's own limit on a search's top-k (limit) and on a shortlist
_GET_CHUNK = 1000  # ids per `get` call: keeps the `id in [...]` expression small
_SEARCH_CHUNK = 256  # queries per `search` call: results stay far below gRPC's 256 MB message cap


class MilvusError(HivlpError):
    """A Milvus index cannot be reached, opened, built or searched as asked."""


class MilvusUnavailableError(MilvusError):
    """The URI does not answer (server down, wrong port, unreadable Lite file)."""


class MilvusLockedError(MilvusError):
    """A Milvus Lite file is held by another process."""


class IndexNotReadyError(MilvusError):
    """The index is missing, or incomplete after an interrupted build."""


class DimensionMismatchError(UsageError):
    """Query vectors (the model) and the index disagree on the embedding dimension."""


def is_lite_uri(uri: str) -> bool:
    return "://" not in uri and not uri.startswith("unix:")


@contextlib.contextmanager
def _quiet_milvus_logs() -> Iterator[None]:
    """pymilvus and milvus_lite log a traceback for each failed call; we raise a clearer error instead."""
    loggers = [logging.getLogger(n) for n in ("pymilvus", "milvus_lite", "grpc", "faiss")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def quiet_backend_logs() -> None:
    """For the CLI: keep Milvus Lite's and FAISS's INFO chatter (server start/stop, CPU
    feature probing) out of the output; their warnings still show."""
    for name in ("milvus_lite", "faiss"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _lite_locked_elsewhere(db: Path) -> bool:
    lock = db / "LOCK"
    if not lock.is_file():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def connect(uri: str, token: str | None = None, timeout: float = CONNECT_TIMEOUT_S) -> Any:
    """A MilvusClient for a Lite `.db` path or a server URI, with errors that say what to do."""
    from pymilvus import MilvusClient

    if is_lite_uri(uri):
        db = Path(uri)
        if db.suffix != ".db":
            raise UsageError(
                f"--uri {uri}: a Milvus Lite index is a path ending in .db "
                f"(default {DEFAULT_URI}); a server is http://host:19530"
            )
        if db.is_file():
            raise UsageError(
                f"{db} is a file, not a Milvus Lite data folder: files of milvus-lite < 3 cannot be "
                "opened by Milvus Lite 3; index into a new .db path"
            )
        db.parent.mkdir(parents=True, exist_ok=True)
        with _quiet_milvus_logs():
            try:
                return MilvusClient(str(db), timeout=timeout)
            except Exception as e:
                if _lite_locked_elsewhere(db):
                    raise MilvusLockedError(
                        f"Milvus Lite file {db} is locked by another process: a .db opens in one "
                        "process at a time. Wait for the other `hivlp index`/`search`/`evaluate` (or "
                        "notebook) to finish or stop it, or copy the .db and use the copy, or serve it "
                        f"with `milvus-lite server --data-dir {db}` and pass --uri http://127.0.0.1:19530"
                    ) from None
                raise MilvusUnavailableError(f"cannot open Milvus Lite file {db}: {e}") from None
    token = token if token is not None else os.environ.get("MILVUS_TOKEN", "")
    with _quiet_milvus_logs():
        try:
            return MilvusClient(uri=uri, token=token, timeout=timeout)
        except Exception as e:
            reason = getattr(e, "message", None) or str(e)
            raise MilvusUnavailableError(
                f"cannot reach Milvus at {uri} (waited up to {timeout:g} s): {reason}. Check that the "
                "server is running and the host/port (default 19530), set MILVUS_TOKEN if it needs "
                f"auth, or pass a local path such as --uri {DEFAULT_URI} for Milvus Lite"
            ) from None


@dataclass
class IndexInfo:
    """What an index holds, read back from its collection properties."""

    name: str
    uri: str
    dim: int
    coarse_dim: int
    index_type: str
    weights_sha256: str
    digest: str
    kinds: tuple[str, ...]
    expected: dict[str, int]
    complete: bool

    def properties(self) -> dict[str, str]:
        return {
            "hivlp.dim": str(self.dim),
            "hivlp.coarse_dim": str(self.coarse_dim),
            "hivlp.index": self.index_type,
            "hivlp.weights_sha256": self.weights_sha256,
            "hivlp.digest": self.digest,
            "hivlp.kinds": ",".join(self.kinds),
            "hivlp.expected": json.dumps(self.expected, sort_keys=True),
            "hivlp.complete": "true" if self.complete else "false",
        }

    @classmethod
    def from_properties(cls, name: str, uri: str, props: dict[str, str]) -> IndexInfo:
        try:
            return cls(
                name=name,
                uri=uri,
                dim=int(props["hivlp.dim"]),
                coarse_dim=int(props["hivlp.coarse_dim"]),
                index_type=props["hivlp.index"],
                weights_sha256=props["hivlp.weights_sha256"],
                digest=props["hivlp.digest"],
                kinds=tuple(props["hivlp.kinds"].split(",")),
                expected=json.loads(props["hivlp.expected"]),
                complete=props.get("hivlp.complete") == "true",
            )
        except (KeyError, ValueError) as e:
            raise MilvusError(
                f"collection {name}_coarse at {uri} was not built by `hivlp index` (property {e} "
                "missing or malformed); use another --name or drop it"
            ) from None

    def same_content(self, other: IndexInfo) -> bool:
        """Same rows, dims and index type: a re-run may resume or skip instead of rebuilding."""
        keep = ("dim", "coarse_dim", "index_type", "weights_sha256", "digest", "kinds", "expected")
        return all(getattr(self, k) == getattr(other, k) for k in keep)


# A batch of rows to index: id [b] int64, kind [b] str, embedding [b, D] float32, and metadata lists
# imgid / sentid (None allowed), filename / caption (None allowed).
RowBatch = dict[str, Any]


class MilvusDualIndex(SearchEngine):
    """The `<name>_coarse` + `<name>_fine` collection pair at one URI, behind the engine interface."""

    def __init__(
        self,
        uri: str = DEFAULT_URI,
        name: str = DEFAULT_NAME,
        token: str | None = None,
        timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,200}", name):
            raise UsageError(
                f"--name {name!r}: Milvus collection names take letters, digits and underscores, "
                "starting with a letter or underscore"
            )
        self.uri = str(uri)
        self.name = name
        self.coarse = f"{name}_coarse"
        self.fine = f"{name}_fine"
        self._client = connect(self.uri, token, timeout)
        self._info: IndexInfo | None = None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> MilvusDualIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- metadata

    def exists(self) -> bool:
        return self._client.has_collection(self.coarse) and self._client.has_collection(self.fine)

    def read_info(self) -> IndexInfo | None:
        """The index's metadata, or None when either collection is missing.

        The pair is complete only when both collections say so (the coarse one is marked last).
        """
        if not self.exists():
            return None
        props = [self._client.describe_collection(c).get("properties", {}) for c in (self.coarse, self.fine)]
        info = IndexInfo.from_properties(self.name, self.uri, props[0])
        info.complete = info.complete and props[1].get("hivlp.complete") == "true"
        return info

    def info(self) -> IndexInfo:
        """Metadata of a complete index, loaded for search; raises IndexNotReadyError otherwise."""
        if self._info is not None:
            return self._info
        info = self.read_info()
        if info is None:
            raise IndexNotReadyError(
                f"no index named {self.name!r} at {self.uri} (collections {self.coarse}, {self.fine}); "
                f"build it with `hivlp index --embeddings DIR --uri {self.uri} --name {self.name}`"
            )
        if not info.complete:
            raise IndexNotReadyError(
                f"index {self.name!r} at {self.uri} is incomplete (its last build stopped before all "
                f"rows were in); re-run `hivlp index --embeddings DIR --uri {self.uri} --name {self.name}` "
                "to complete it"
            )
        for c in (self.coarse, self.fine):
            self._client.load_collection(c)
        self._info = info
        return info

    def counts(self) -> dict[str, int]:
        """Rows per kind in each collection, counted by the server ({"coarse": {...}, "fine": {...}})."""
        out: dict[str, dict[str, int]] = {}
        for label, coll in (("coarse", self.coarse), ("fine", self.fine)):
            self._client.load_collection(coll)
            out[label] = {}
            for kind in KINDS:
                # A filter, not partition_names: Milvus Lite counts the whole collection with the latter.
                res = self._client.query(coll, filter=f'kind == "{kind}"', output_fields=["count(*)"])
                out[label][kind] = int(res[0]["count(*)"])
        return out

    # ---------------------------------------------------------------- build

    def build(
        self,
        embeddings_dir: str | Path,
        coarse_dim: int = 64,
        index: str = "HNSW",
        kinds: Sequence[str] = KINDS,
        batch_size: int = 2000,
        max_rows: int | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Index an export folder (see hivlp.embeddings.format); idempotent, resumes an interrupted build.

        `max_rows` stops after upserting that many rows, leaving the index marked incomplete (it
        simulates a crash for tests). Returns a summary with counts and timings.
        """
        from hivlp.embeddings.format import (
            batch_embeddings,
            iter_shard_batches,
            read_manifest,
        )

        kinds = _check_kinds(kinds)
        manifest = read_manifest(embeddings_dir)
        if not manifest["complete"]:
            raise UsageError(
                f"{embeddings_dir}: export incomplete, shards {manifest['missing_shards']} of "
                f"{manifest['num_shards']} missing; finish `hivlp export` before indexing"
            )
        digest = hashlib.sha256("|".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()
        wanted = self._wanted_info(
            dim=manifest["dim"], coarse_dim=coarse_dim, index=index, kinds=kinds,
            weights_sha256=manifest["weights_sha256"], digest=digest,
            expected={k: int(manifest["counts"][k]) for k in kinds},
        )
        if coarse_dim not in manifest["levels"]:
            log.warning("coarse_dim %d is not a trained level %s of this model", coarse_dim, manifest["levels"])

        def batches() -> Iterator[RowBatch]:
            for b in iter_shard_batches(embeddings_dir, batch_size=batch_size, kinds=kinds):
                cols = b.to_pydict()
                del cols["embedding"]
                cols["embedding"] = batch_embeddings(b)
                yield cols

        return self._build(wanted, batches, batch_size, max_rows, progress)

    def build_from_arrays(
        self,
        embeddings: np.ndarray,
        ids: np.ndarray,
        kinds: Sequence[str],
        coarse_dim: int = 64,
        index: str = "HNSW",
        metadata: dict[str, Sequence[Any]] | None = None,
        batch_size: int = 2000,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Index in-memory vectors (evaluation, benchmarks): same collections, no export folder.

        `metadata` may give per-row imgid/sentid/filename/caption lists; missing ones are null.
        """
        emb = np.asarray(embeddings, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        row_kinds = np.asarray(kinds)
        if emb.ndim != 2 or len(ids) != len(emb) or len(row_kinds) != len(emb):
            raise UsageError(
                f"build_from_arrays: need embeddings [N, D] with N ids and N kinds, got {emb.shape}, "
                f"{len(ids)} ids, {len(row_kinds)} kinds"
            )
        if len(np.unique(ids)) != len(ids):
            raise UsageError("build_from_arrays: ids must be unique (they are primary keys)")
        present = _check_kinds(sorted(set(row_kinds.tolist())))
        h = hashlib.sha256(emb.tobytes())
        h.update(ids.tobytes())
        h.update("\n".join(row_kinds.tolist()).encode())
        wanted = self._wanted_info(
            dim=emb.shape[1], coarse_dim=coarse_dim, index=index, kinds=present,
            weights_sha256="arrays", digest=h.hexdigest(),
            expected={k: int((row_kinds == k).sum()) for k in present},
        )
        meta = {k: list(v) for k, v in (metadata or {}).items()}

        def batches() -> Iterator[RowBatch]:
            for s in range(0, len(ids), batch_size):
                e = min(s + batch_size, len(ids))
                b: RowBatch = {"id": ids[s:e].tolist(), "kind": row_kinds[s:e].tolist(), "embedding": emb[s:e]}
                for f in ("imgid", "sentid", "filename", "caption"):
                    b[f] = meta[f][s:e] if f in meta else [None] * (e - s)
                yield b

        return self._build(wanted, batches, batch_size, None, progress)

    def _wanted_info(self, *, dim: int, coarse_dim: int, index: str, kinds: tuple[str, ...],
                     weights_sha256: str, digest: str, expected: dict[str, int]) -> IndexInfo:
        index = index.upper()
        if index not in INDEX_TYPES:
            raise UsageError(f"--index {index}: expected one of {', '.join(INDEX_TYPES)}")
        if not 0 < coarse_dim <= dim:
            raise UsageError(f"--coarse-dim {coarse_dim}: must be between 1 and the embedding dim {dim}")
        return IndexInfo(
            name=self.name, uri=self.uri, dim=int(dim), coarse_dim=int(coarse_dim), index_type=index,
            weights_sha256=weights_sha256, digest=digest, kinds=tuple(kinds), expected=expected,
            complete=False,
        )

    def _build(
        self,
        wanted: IndexInfo,
        batches: Callable[[], Iterable[RowBatch]],
        batch_size: int,
        max_rows: int | None,
        progress: bool,
    ) -> dict[str, Any]:
        from tqdm import tqdm

        if batch_size < 1:  # before the index is read or touched
            raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
        t0 = time.perf_counter()
        total = sum(wanted.expected.values())
        have = self.read_info()
        if have is not None and not have.same_content(wanted):
            log.warning(
                "index %r at %s holds other content (dims, index type, model or rows differ); rebuilding",
                self.name, self.uri,
            )
            self.drop()
            have = None
        if have is not None:
            want = {k: wanted.expected.get(k, 0) for k in KINDS}
            counts = self.counts().values()
            if have.complete and all(got == want for got in counts):
                log.info("index %r at %s is complete and up to date; nothing to do", self.name, self.uri)
                return self._summary(wanted, "unchanged", 0, t0)
            if any(got[k] > want[k] for got in counts for k in KINDS):
                log.warning("index %r at %s holds rows the export lacks; rebuilding", self.name, self.uri)
                self.drop()
                have = None
        if have is None:
            self.drop()  # a half-created pair (a crash between the two creates) has no data worth keeping
            self._create(wanted)
        else:
            self._mark(False)
            log.info("index %r at %s is incomplete; completing it (upserts never duplicate)", self.name, self.uri)
        self._info = None

        done = 0
        bar = tqdm(total=total, desc=f"index {self.name}", unit="row", disable=not progress)
        for batch in batches():
            if max_rows is not None and done + len(batch["id"]) > max_rows:
                batch = {k: v[: max_rows - done] for k, v in batch.items()}
            self._upsert(batch, wanted.coarse_dim)
            done += len(batch["id"])
            bar.update(len(batch["id"]))
            if max_rows is not None and done >= max_rows:
                break
        bar.close()
        for c in (self.coarse, self.fine):
            self._client.flush(c)
        if max_rows is not None and done < total:
            log.warning("stopped after %d of %d rows (max_rows); the index stays incomplete", done, total)
            return self._summary(wanted, "incomplete", done, t0)
        t_insert = time.perf_counter() - t0
        self._ensure_indexes(wanted)
        counts = self.counts()
        for label, got in counts.items():
            want = {k: wanted.expected.get(k, 0) for k in KINDS}
            if got != want:
                raise MilvusError(
                    f"{self.name}_{label} at {self.uri} holds {got} rows after the build, expected {want} "
                    "from the export manifest; re-run `hivlp index` (if it persists, drop the index)"
                )
        self._mark(True)
        out = self._summary(wanted, "built", done, t0)
        out["insert_s"] = round(t_insert, 3)
        return out

    def _summary(self, info: IndexInfo, status: str, upserted: int, t0: float) -> dict[str, Any]:
        return {
            "status": status, "name": self.name, "uri": redact(self.uri), "dim": info.dim,
            "coarse_dim": info.coarse_dim, "index": info.index_type, "counts": info.expected,
            "upserted": upserted, "seconds": round(time.perf_counter() - t0, 3),
        }

    def _create(self, info: IndexInfo) -> None:
        from pymilvus import DataType, MilvusClient

        for coll, dim in ((self.fine, info.dim), (self.coarse, info.coarse_dim)):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("kind", DataType.VARCHAR, max_length=8)
            schema.add_field("imgid", DataType.INT64, nullable=True)
            schema.add_field("sentid", DataType.INT64, nullable=True)
            schema.add_field("filename", DataType.VARCHAR, max_length=1024, nullable=True)
            schema.add_field("caption", DataType.VARCHAR, max_length=65535, nullable=True)
            schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=dim)
            self._client.create_collection(
                coll, schema=schema, properties=info.properties(), consistency_level="Strong"
            )
            for kind in KINDS:
                self._client.create_partition(coll, kind)

    def _mark(self, complete: bool) -> None:
        """Set hivlp.complete; when marking complete, the fine collection goes first, the coarse last."""
        value = {"hivlp.complete": "true" if complete else "false"}
        order = (self.fine, self.coarse) if complete else (self.coarse, self.fine)
        for c in order:
            self._client.alter_collection_properties(c, properties=value)

    def _upsert(self, batch: RowBatch, coarse_dim: int) -> None:
        emb = np.asarray(batch["embedding"], dtype=np.float32)
        vectors = {self.fine: l2_normalize(emb), self.coarse: l2_normalize(emb[:, :coarse_dim])}
        kinds = np.asarray(batch["kind"])
        for kind in KINDS:
            sel = np.flatnonzero(kinds == kind)
            if not len(sel):
                continue
            meta = [
                {f: batch[f][i] for f in ("id", *META_FIELDS)} for i in sel.tolist()
            ]
            for coll, vecs in vectors.items():
                rows = [dict(m, **{VECTOR: vecs[i]}) for m, i in zip(meta, sel.tolist())]
                self._client.upsert(coll, rows, partition_name=kind)

    def _ensure_indexes(self, info: IndexInfo) -> None:
        specs = {self.coarse: _index_params(info.index_type, sum(info.expected.values())), self.fine: ("FLAT", {})}
        for coll, (itype, params) in specs.items():
            if not self._client.list_indexes(coll, field_name=VECTOR):
                ip = self._client.prepare_index_params()
                ip.add_index(field_name=VECTOR, index_type=itype, metric_type="IP", params=params)
                with _quiet_milvus_logs():  # Lite lacks AllocTimestamp; pymilvus copes but logs it
                    self._client.create_index(coll, ip)
            self._client.load_collection(coll)

    def drop(self) -> None:
        """Drop both collections (missing ones are skipped)."""
        for c in (self.coarse, self.fine):
            if self._client.has_collection(c):
                self._client.drop_collection(c)
        self._info = None

    # ---------------------------------------------------------------- search

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        shortlist: int = 100,
        kind: str = "image",
        ef: int | None = None,
        timings: dict[str, float] | None = None,
    ) -> SearchResult:
        """Coarse ANN search (top `shortlist` of `kind`), fetch full vectors by id, re-rank, top k.

        As the in-memory engines, k is capped at the number of `kind` rows; a query the ANN index
        returns fewer than k candidates for is padded with id -1 and score -inf. `ef` overrides the
        HNSW search breadth (default 8 * shortlist, see `_search_params`). `timings`, when given,
        receives the milliseconds of the coarse pass and of the re-rank (fetch + score; keys "coarse",
        "rerank"), as the in-memory engine's does.
        """
        t0 = time.perf_counter()
        info = self.info()
        q = self._check_queries(queries, kind, info)
        k = self._check_k(k, kind, info)
        shortlist = max(int(shortlist), int(k))
        cand, _ = self._coarse_candidates(l2_normalize(q[:, : info.coarse_dim]), shortlist, kind, info, ef)
        t1 = time.perf_counter()
        full = l2_normalize(q)
        uniq = np.unique(np.concatenate(cand)) if cand else np.zeros(0, np.int64)
        vecs = self._fetch_vectors(uniq)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        for i, c in enumerate(cand):
            if not len(c):
                continue
            s = vecs[np.searchsorted(uniq, c)] @ full[i]
            top = np.argsort(-s, kind="stable")[:k]
            ids[i, : len(top)] = c[top]
            scores[i, : len(top)] = s[top]
        if timings is not None:
            timings["coarse"] = 1000 * (t1 - t0)
            timings["rerank"] = 1000 * (time.perf_counter() - t1)
        return SearchResult(ids=ids, scores=scores)

    def _check_queries(self, queries: np.ndarray, kind: str, info: IndexInfo) -> np.ndarray:
        if kind not in info.kinds:
            raise UsageError(f"index {self.name!r} holds {list(info.kinds)} rows, not {kind!r}")
        q = np.asarray(queries, dtype=np.float32)
        q = q[None, :] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != info.dim:
            raise DimensionMismatchError(
                f"query vectors are {q.shape[-1]}-d but index {self.name!r} at {self.uri} holds "
                f"{info.dim}-d vectors; encode queries with the model the index was built from "
                f"(weights sha256 {info.weights_sha256[:12]}) or re-run `hivlp export` and `hivlp index`"
            )
        return q

    @staticmethod
    def _check_k(k: int, kind: str, info: IndexInfo) -> int:
        if k < 1:
            raise UsageError(f"k must be >= 1, got {k}")
        return min(int(k), info.expected[kind])

    def search_coarse(
        self, queries: np.ndarray, k: int = 10, kind: str = "image", ef: int | None = None
    ) -> SearchResult:
        """The coarse level alone: ANN search of `<name>_coarse` (no re-rank). Scores are cosines of the
        `coarse_dim` prefix; an index built with coarse_dim = dim is a single full-dim collection."""
        info = self.info()
        q = self._check_queries(queries, kind, info)
        k = self._check_k(k, kind, info)
        ids, scores = self._coarse_candidates(l2_normalize(q[:, : info.coarse_dim]), k, kind, info, ef)
        out_ids = np.full((len(q), k), -1, dtype=np.int64)
        out_scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        for i, (c, s) in enumerate(zip(ids, scores)):
            out_ids[i, : len(c)] = c[:k]
            out_scores[i, : len(c)] = s[:k]
        return SearchResult(ids=out_ids, scores=out_scores)

    def _coarse_candidates(
        self, qc: np.ndarray, limit: int, kind: str, info: IndexInfo, ef: int | None
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        params = _search_params(info.index_type, limit, sum(info.expected.values()), ef)
        ids, scores = [], []
        for s in range(0, len(qc), _SEARCH_CHUNK):
            hits = self._client.search(
                self.coarse, data=list(qc[s : s + _SEARCH_CHUNK]), limit=limit, anns_field=VECTOR,
                partition_names=[kind], search_params=params, output_fields=["id"],
            )
            for row in hits:
                ids.append(_hit_ids(row))
                scores.append(np.asarray(row.distances, dtype=np.float32))
        return ids, scores

    def _fetch_vectors(self, ids: np.ndarray) -> np.ndarray:
        """Full vectors of `ids` (sorted, unique) from `<name>_fine`, in that order."""
        out = np.empty((len(ids), self.info().dim), dtype=np.float32)
        for s in range(0, len(ids), _GET_CHUNK):
            chunk = ids[s : s + _GET_CHUNK]
            rows = self._client.get(self.fine, ids=chunk.tolist(), output_fields=[VECTOR])
            if len(rows) != len(chunk):
                raise IndexNotReadyError(
                    f"{self.fine} at {self.uri} lacks {len(chunk) - len(rows)} ids found in "
                    f"{self.coarse}; re-run `hivlp index --uri {self.uri} --name {self.name}`"
                )
            got = np.array([r["id"] for r in rows], dtype=np.int64)
            out[s + np.searchsorted(chunk, got)] = np.asarray([r[VECTOR] for r in rows], dtype=np.float32)
        return out

    def describe(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Display metadata (kind, imgid, sentid, filename, caption) of ids, keyed by id."""
        wanted = [int(i) for i in ids if int(i) >= 0]
        out: dict[int, dict[str, Any]] = {}
        for s in range(0, len(wanted), _GET_CHUNK):
            for r in self._client.get(self.coarse, ids=wanted[s : s + _GET_CHUNK], output_fields=META_FIELDS):
                out[int(r["id"])] = {f: r.get(f) for f in META_FIELDS}
        return out


def _hit_ids(row: Any) -> np.ndarray:
    """Ids of one query's hits. `row.ids` skips pymilvus' per-hit decoding; output_fields=["id"] in
    the search keeps Milvus Lite from shipping every stored vector back with the hits."""
    return np.asarray(row.ids, dtype=np.int64)


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise UsageError(f"kinds {list(kinds)}: choose from {list(KINDS)}")
    return tuple(k for k in KINDS if k in kinds)


def _index_params(index_type: str, n: int) -> tuple[str, dict[str, int]]:
    if index_type == "HNSW":
        return "HNSW", {"M": 16, "efConstruction": 200}
    if index_type == "IVF_FLAT":
        return "IVF_FLAT", {"nlist": _nlist(n)}
    return "FLAT", {}


def _nlist(n: int) -> int:
    """4*sqrt(N) lists, the usual IVF rule. Milvus Lite 3.2 ignores build params sent by pymilvus
    3.0 (flattened keys) and uses its defaults (HNSW M=16/efConstruction=200, as here; IVF 128
    lists per segment, fewer for small segments); a server uses these."""
    return int(np.clip(4 * np.sqrt(max(n, 1)), 16, 65536))


def _search_params(index_type: str, limit: int, n: int, ef: int | None) -> dict[str, Any]:
    """Generous defaults: the coarse pass should return the exact prefix top-`limit` (nearly)
    always, since the re-rank cannot recover a candidate the shortlist missed. HNSW: ef = 8*limit
    (its agreement with exact search is measured in bench/results/); IVF_FLAT: a quarter of the lists
    and at least 32 (FAISS caps nprobe at the segment's nlist). An explicit `ef` wins (never below
    `limit`)."""
    if index_type == "HNSW":
        ef = max(ef, limit) if ef is not None else min(max(8 * limit, 256), 32768)
        return {"metric_type": "IP", "params": {"ef": ef}}
    if index_type == "IVF_FLAT":
        return {"metric_type": "IP", "params": {"nprobe": max(32, _nlist(n) // 4)}}
    return {"metric_type": "IP", "params": {}}
