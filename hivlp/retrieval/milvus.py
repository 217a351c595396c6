"""Milvus dual-collection index: coarse ANN search on a low-dim prefix, exact re-rank on full vectors.

An index named NAME is served under two Milvus aliases, `NAME_coarse` and `NAME_fine`, which point at
one *version*: the collection pair `NAME__v<N>_coarse` + `NAME__v<N>_fine`, sharing primary keys and
display metadata (kind, imgid, sentid, filename, caption):

- `..._coarse`: the first `coarse_dim` dims of each embedding, L2-renormalised, under an ANN index
  (HNSW, IVF_FLAT or FLAT; inner product, which equals cosine on unit vectors);
- `..._fine`: the full vectors, L2-normalised (FLAT index: Milvus only loads indexed collections);
- beside them, a local memory-mapped copy of the full vectors (`hivlp.retrieval.vector_store`), which
  the re-rank reads instead of fetching the shortlist from `..._fine` by id (the fine collection stays
  the source of truth and the fallback when the store is absent, e.g. on another machine).

Never down: `build` writes a new version next to the served one, verifies it completely (row counts
with Strong consistency, the export's shard checksums, sampled rows read back from both collections
and the store, a probe search), marks it complete and only then moves the aliases (fine first, coarse
last; searches resolve the coarse one), so searches switch at once. The previous `keep` versions stay;
older ones are dropped after the swap. A build that fails is dropped and the served version keeps
serving; one that is killed leaves an incomplete, unserved version that the next run of the same
export completes (upserts by id never duplicate rows) and a run of other content drops.

Consistency: searches run at Bounded consistency (a Milvus 2.3 server answers a Strong search only
after its next time tick, about 200 ms); nothing is written to a served version, so Bounded reads
are exact; verification and counts use Strong. Schemas have no nullable fields (a Milvus 2.3 server
has none): a missing imgid/sentid is stored as -1, a missing filename/caption as "" (read back as None).

Index metadata lives in collection properties (`hivlp.*`): dims, checkpoint weights hash, a digest of
the source rows, the expected row count per kind and `hivlp.complete`.

URIs: a path ending in `.db` is a Milvus Lite file (one process at a time); `http://host:19530`
reaches a Milvus server with the same code (token from `MILVUS_TOKEN`). `hivlp.retrieval.milvus_server`
starts a local Milvus 2.3 standalone server (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hivlp.errors import HivlpError, UsageError
from hivlp.redact import redact
from hivlp.retrieval import vector_store as vs
from hivlp.retrieval.inmemory import SearchEngine, SearchResult, l2_normalize
from hivlp.retrieval.vector_store import VectorStore, VectorStoreWriter

log = logging.getLogger(__name__)

DEFAULT_URI = "outputs/milvus/hivlp.db"
DEFAULT_NAME = "hivlp"
KINDS = ("image", "text")
INDEX_TYPES = ("HNSW", "IVF_FLAT", "FLAT")
VECTOR = "vector"
META_FIELDS = ["kind", "imgid", "sentid", "filename", "caption"]
CONNECT_TIMEOUT_S = 10.0
# Opening a Lite file this process already serves is retried this many times (see _open_lite).
LITE_OPEN_ATTEMPTS = 3
MAX_TOPK = 16384  # Milvus's own limit on a search's top-k (limit) and on a shortlist
_GET_CHUNK = 1000  # ids per `get` call: keeps the `id in [...]` expression small
_SEARCH_CHUNK = 256  # queries per `search` call: results stay far below gRPC's 256 MB message cap
_GATHER_BLOCK = 1 << 24  # full-vector floats gathered per re-rank block (64 MB): bounds a batch's memory
DEFAULT_INDEX = "HNSW"
DEFAULT_KEEP = 1  # previous versions kept after a swap
ALIAS_TTL_S = 2.0  # a search process re-resolves the aliases at most this often (and at once on an error)
SERVING_CONSISTENCY = "Bounded"
VERIFY_SAMPLE = 64  # rows read back from a new version before it serves
STORE_ENV = "HIVLP_VECTOR_STORE"
INDEX_WAIT_S = 3600.0  # longest wait for a server to index a new version's rows
HNSW_EF = 256  # default HNSW search breadth (never below the shortlist); see _search_params
IVF_NPROBE = 64


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


def _lite_lock_holder(db: Path) -> int | None:
    """The pid holding the Milvus Lite file's LOCK, None when it is free.

    Read from /proc/locks (Linux), which names the holder: a Lite server runs inside the process that
    opened the file, so the holder may be this very process (another client of the same path here).
    Without /proc, a probe lock tells only held/free (-1 = held by someone).
    """
    lock = db / "LOCK"
    if not lock.is_file():
        return None
    try:
        inode = lock.stat().st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (a "->" marks a waiter)
            if len(fields) >= 6 and fields[1] != "->" and fields[5].rsplit(":", 1)[-1] == str(inode):
                return int(fields[4])
        return None
    except (OSError, ValueError):
        pass
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return -1
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _open_lite(db: Path, timeout: float) -> Any:
    """A MilvusClient on a Lite file. Milvus Lite serves a file from the process that opened it, so a
    second client in this process shares that server; a failed open there (a transient gRPC error on
    a loaded machine) is retried, a file held by another process is named as such."""
    from pymilvus import MilvusClient

    for attempt in range(LITE_OPEN_ATTEMPTS):
        try:
            return MilvusClient(str(db), timeout=timeout)
        except Exception as e:  # pymilvus raises several types here; each is reported below
            holder = _lite_lock_holder(db)
            if holder is not None and holder != os.getpid():
                who = "another process" if holder < 0 else f"another process (pid {holder})"
                raise MilvusLockedError(
                    f"Milvus Lite file {db} is locked by {who}: a .db opens in one "
                    "process at a time. Wait for the other `hivlp index`/`search`/`evaluate` (or "
                    "notebook) to finish or stop it, or copy the .db and use the copy, or serve it "
                    f"with `milvus-lite server --data-dir {db}` and pass --uri http://127.0.0.1:19530"
                ) from None
            reason = getattr(e, "message", None) or str(e) or type(e).__name__
            if attempt + 1 == LITE_OPEN_ATTEMPTS:
                raise MilvusUnavailableError(f"cannot open Milvus Lite file {db}: {reason}") from None
            log.debug("opening %s failed (%s), retrying", db, reason)
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


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
            return _open_lite(db, timeout)
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


def check_build_args(
    batch_size: int, keep: int, coarse_dim: int = 1, index: str = DEFAULT_INDEX, kinds: Sequence[str] = KINDS
) -> None:
    """Refuse bad build arguments before anything connects to, reads or touches an index (the
    coarse dim's upper bound, the export's dim, is checked once the export is read)."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if keep < 0:
        raise UsageError(f"--keep must be >= 0 (previous versions kept after a swap), got {keep}")
    _check_index_args(coarse_dim, index, kinds)


def _check_index_args(coarse_dim: int, index: str, kinds: Sequence[str], dim: int | None = None) -> None:
    """The index's shape arguments; the coarse dim's upper bound once the embedding dim is known."""
    if index.upper() not in INDEX_TYPES:
        raise UsageError(f"--index {index}: expected one of {', '.join(INDEX_TYPES)}")
    if coarse_dim < 1 or (dim is not None and coarse_dim > dim):
        raise UsageError(f"--coarse-dim {coarse_dim}: must be between 1 and the embedding dim"
                         + (f" {dim}" if dim is not None else ""))
    _check_kinds(kinds)


class MilvusDualIndex(SearchEngine):
    """The coarse + fine collection pair served under `<name>_coarse` / `<name>_fine` at one URI.

    Those two names are Milvus aliases of one version pair `<name>__v<N>_coarse` / `_fine`; `build`
    writes a new version beside the served one, verifies it and moves the aliases (see the module
    docstring). Searches resolve the aliases once and keep the answer for ALIAS_TTL_S seconds (and
    resolve again at once when a search of the cached version fails), so a query costs one Milvus
    call plus a read of the local vector store.
    """

    def __init__(
        self,
        uri: str = DEFAULT_URI,
        name: str = DEFAULT_NAME,
        token: str | None = None,
        timeout: float = CONNECT_TIMEOUT_S,
        store_dir: str | Path | None = None,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,180}", name) or "__v" in name:
            raise UsageError(
                f"--name {name!r}: Milvus collection names take letters, digits and underscores, "
                "starting with a letter or underscore (and not containing '__v', kept for versions)"
            )
        self.uri = str(uri)
        self.name = name
        self.alias_coarse = f"{name}_coarse"
        self.alias_fine = f"{name}_fine"
        self.store_dir = Path(store_dir) if store_dir is not None else default_store_dir(self.uri)
        self._lite = is_lite_uri(self.uri)
        self._client = connect(self.uri, token, timeout)
        self._served: tuple[str, str] | None = None
        self._served_at = -np.inf
        self._infos: dict[str, IndexInfo] = {}
        self._stores: dict[str, VectorStore | None] = {}
        self._lock = threading.Lock()
        self._loaded: set[str] = set()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> MilvusDualIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- names and versions

    def version_names(self, version: int) -> tuple[str, str]:
        return f"{self.name}__v{version}_coarse", f"{self.name}__v{version}_fine"

    def versions(self) -> list[int]:
        """Version numbers with a coarse collection at this URI, ascending."""
        pat = re.compile(rf"{re.escape(self.name)}__v(\d+)_coarse")
        return sorted(int(m.group(1)) for c in self._client.list_collections() if (m := pat.fullmatch(c)))

    def _alias_target(self, alias: str) -> str | None:
        with _quiet_milvus_logs():
            try:
                return self._client.describe_alias(alias)["collection_name"]
            except Exception:
                return None

    def served(self, refresh: bool = False) -> tuple[str, str] | None:
        """(coarse, fine) collections the aliases point at now, or None when nothing is served.

        Cached for ALIAS_TTL_S seconds unless `refresh`. The fine collection is derived from the
        coarse alias's target (the coarse alias moves last), so a search never pairs two versions.
        An index built before versioning (real collections named like the aliases) is served as is.
        """
        with self._lock:
            now = time.monotonic()
            if not refresh and self._served is not None and now - self._served_at < ALIAS_TTL_S:
                return self._served
        target = self._alias_target(self.alias_coarse)
        if target is not None:
            pair: tuple[str, str] | None = (target, target[: -len("_coarse")] + "_fine")
        elif self._client.has_collection(self.alias_coarse) and self._client.has_collection(self.alias_fine):
            pair = (self.alias_coarse, self.alias_fine)  # built before versioning
        else:
            pair = None
        with self._lock:
            self._served, self._served_at = pair, time.monotonic()
        return pair

    @property
    def coarse(self) -> str:
        """The coarse collection served now (the alias name when nothing is)."""
        pair = self.served()
        return pair[0] if pair else self.alias_coarse

    @property
    def fine(self) -> str:
        pair = self.served()
        return pair[1] if pair else self.alias_fine

    # ---------------------------------------------------------------- metadata

    def exists(self) -> bool:
        return self.served(refresh=True) is not None

    def _read_pair_info(self, pair: tuple[str, str]) -> IndexInfo | None:
        coarse, fine = pair
        if not (self._client.has_collection(coarse) and self._client.has_collection(fine)):
            return None
        props = [self._client.describe_collection(c).get("properties", {}) for c in pair]
        info = IndexInfo.from_properties(self.name, self.uri, props[0])
        info.complete = info.complete and props[1].get("hivlp.complete") == "true"
        return info

    def _unserved_pair(self) -> tuple[str, str] | None:
        """The newest version pair (for reports on an index whose only build is incomplete)."""
        v = self.versions()
        return self.version_names(v[-1]) if v else None

    def read_info(self) -> IndexInfo | None:
        """Metadata of the served version (or, when none is served, of the newest version built so
        far, complete or not); None when there is neither. Complete only when both collections say so."""
        pair = self.served(refresh=True) or self._unserved_pair()
        return None if pair is None else self._read_pair_info(pair)

    def _serving(self) -> tuple[IndexInfo, str, str]:
        """(info, coarse, fine) of the served version, loaded for search; IndexNotReadyError otherwise."""
        pair = self.served()
        if pair is not None and pair[0] in self._infos:
            return self._infos[pair[0]], pair[0], pair[1]
        info = None if pair is None else self._read_pair_info(pair)
        if info is None:
            part = self._unserved_pair()
            if part is not None and (pinfo := self._read_pair_info(part)) is not None and not pinfo.complete:
                info = pinfo
            else:
                raise IndexNotReadyError(
                    f"no index named {self.name!r} at {self.uri} (aliases {self.alias_coarse}, {self.alias_fine}); "
                    f"build it with `hivlp index --embeddings DIR --uri {self.uri} --name {self.name}`"
                )
        if not info.complete:
            raise IndexNotReadyError(
                f"index {self.name!r} at {self.uri} is incomplete (its last build stopped before all "
                f"rows were in); re-run `hivlp index --embeddings DIR --uri {self.uri} --name {self.name}` "
                "to complete it"
            )
        for c in pair:
            self._load(c)
        self._infos[pair[0]] = info
        return info, pair[0], pair[1]

    def info(self) -> IndexInfo:
        """Metadata of the served, complete index, loaded for search; raises IndexNotReadyError otherwise."""
        return self._serving()[0]

    def _counts_of(self, pair: tuple[str, str]) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for label, coll in zip(("coarse", "fine"), pair):
            self._load(coll)
            out[label] = {}
            for kind in KINDS:
                # A filter, not partition_names: Milvus Lite counts the whole collection with the latter.
                res = self._client.query(coll, filter=f'kind == "{kind}"', output_fields=["count(*)"],
                                         consistency_level="Strong")
                out[label][kind] = int(res[0]["count(*)"])
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per kind in each collection of the served version (else the newest one), counted by
        the server with Strong consistency ({"coarse": {...}, "fine": {...}})."""
        pair = self.served(refresh=True) or self._unserved_pair()
        if pair is None:
            raise IndexNotReadyError(f"no index named {self.name!r} at {self.uri}")
        return self._counts_of(pair)

    # ---------------------------------------------------------------- build

    def build(
        self,
        embeddings_dir: str | Path,
        coarse_dim: int = 64,
        index: str = DEFAULT_INDEX,
        kinds: Sequence[str] = KINDS,
        batch_size: int = 2000,
        max_rows: int | None = None,
        progress: bool = True,
        keep: int = DEFAULT_KEEP,
    ) -> dict[str, Any]:
        """Index an export folder (see hivlp.embeddings.format) as a new version, verify it, then serve it.

        Idempotent: the served version already holding this export is left alone ("unchanged"); an
        interrupted build of the same export is completed. `keep` previous versions stay after the
        swap (for a quick roll back with `alter_alias`), older ones are dropped. `max_rows` stops
        after upserting that many rows, leaving the new version incomplete and unserved (it
        simulates a crash for tests). Returns a summary with counts and timings.
        """
        from hivlp.embeddings.format import (
            batch_embeddings,
            iter_shard_batches,
            manifest_digest,
            read_manifest,
        )

        kinds = _check_kinds(kinds)
        manifest = read_manifest(embeddings_dir)
        if not manifest["complete"]:
            raise UsageError(
                f"{embeddings_dir}: export incomplete, shards {manifest['missing_shards']} of "
                f"{manifest['num_shards']} missing; finish `hivlp export` before indexing"
            )
        wanted = self._wanted_info(
            dim=manifest["dim"], coarse_dim=coarse_dim, index=index, kinds=kinds,
            weights_sha256=manifest["weights_sha256"], digest=manifest_digest(manifest),
            expected={k: int(manifest["counts"][k]) for k in kinds},
        )
        if coarse_dim not in manifest["levels"]:
            log.warning("coarse_dim %d is not a trained level %s of this model", coarse_dim, manifest["levels"])

        def batches() -> Iterator[RowBatch]:
            # iter_shard_batches checks each shard's sha256 against the export's manifest first.
            for b in iter_shard_batches(embeddings_dir, batch_size=batch_size, kinds=kinds):
                cols = b.to_pydict()
                del cols["embedding"]
                cols["embedding"] = batch_embeddings(b)
                yield cols

        return self._build(wanted, batches, batch_size, max_rows, progress, keep)

    def build_from_arrays(
        self,
        embeddings: np.ndarray,
        ids: np.ndarray,
        kinds: Sequence[str],
        coarse_dim: int = 64,
        index: str = DEFAULT_INDEX,
        metadata: dict[str, Sequence[Any]] | None = None,
        batch_size: int = 2000,
        progress: bool = True,
        keep: int = DEFAULT_KEEP,
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

        return self._build(wanted, batches, batch_size, None, progress, keep)

    def _wanted_info(self, *, dim: int, coarse_dim: int, index: str, kinds: tuple[str, ...],
                     weights_sha256: str, digest: str, expected: dict[str, int]) -> IndexInfo:
        _check_index_args(coarse_dim, index, kinds, dim)
        index = index.upper()
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
        keep: int,
    ) -> dict[str, Any]:
        check_build_args(batch_size, keep)  # before the index is read or touched
        t0 = time.perf_counter()
        want = {k: wanted.expected.get(k, 0) for k in KINDS}
        served = self.served(refresh=True)
        if served is not None:
            have = self._read_pair_info(served)
            if (have is not None and have.complete and have.same_content(wanted)
                    and all(got == want for got in self._counts_of(served).values())):
                log.info("index %r at %s is complete and up to date; nothing to do", self.name, self.uri)
                self._prune(keep, served)
                return self._summary(wanted, "unchanged", 0, t0, served)
        # Complete an interrupted build of the same content, else start a new version.
        pair = None
        for v in reversed(self.versions()):
            cand = self.version_names(v)
            if served is not None and cand[0] == served[0]:
                continue
            with contextlib.suppress(MilvusError):
                have = self._read_pair_info(cand)
                if have is not None and not have.complete and have.same_content(wanted):
                    pair = cand
                    break
        self._drop_stale(served, pair)
        if pair is None:
            pair = self.version_names(max(self.versions(), default=0) + 1)
            self._create(pair, wanted)
            log.info("building version %s of index %r at %s", pair[0], self.name, self.uri)
        else:
            log.info("completing the interrupted build %s (upserts never duplicate)", pair[0])
        try:
            done = self._fill(pair, wanted, batches, max_rows, progress)
            if max_rows is not None and done < sum(wanted.expected.values()):
                log.warning("stopped after %d rows (max_rows); version %s stays incomplete and unserved",
                            done, pair[0])
                return self._summary(wanted, "incomplete", done, t0, pair)
            t_insert = time.perf_counter() - t0
            self._ensure_indexes(pair, wanted)
            t_verify = time.perf_counter()
            self._verify(pair, wanted)
            self._mark(pair, True)
            t_verify = time.perf_counter() - t_verify
        except BaseException:
            # A failed build leaves nothing behind and the served version serving.
            with _quiet_milvus_logs(), contextlib.suppress(Exception):
                self._drop_pair(pair)
            raise
        self._swap(pair)
        self._prune(keep, pair)
        out = self._summary(wanted, "built", done, t0, pair)
        out["insert_s"] = round(t_insert, 3)
        out["verify_s"] = round(t_verify, 3)
        out["previous"] = None if served is None else served[0]
        return out

    def _summary(self, info: IndexInfo, status: str, upserted: int, t0: float, pair: tuple[str, str]) -> dict[str, Any]:
        return {
            "status": status, "name": self.name, "uri": redact(self.uri), "collections": list(pair), "dim": info.dim,
            "coarse_dim": info.coarse_dim, "index": info.index_type, "counts": info.expected,
            "upserted": upserted, "seconds": round(time.perf_counter() - t0, 3),
        }

    def _fill(self, pair: tuple[str, str], wanted: IndexInfo, batches: Callable[[], Iterable[RowBatch]],
              max_rows: int | None, progress: bool) -> int:
        """Upsert every row into both collections and the local vector store; keep a sample for `_verify`."""
        from tqdm import tqdm

        total = sum(wanted.expected.values())
        stride = max(1, total // VERIFY_SAMPLE)
        self._sample: dict[int, np.ndarray] = {}
        writer = VectorStoreWriter(self.store_dir, pair[0][: -len("_coarse")], wanted.dim)
        done = 0
        bar = tqdm(total=total, desc=f"index {self.name}", unit="row", disable=not progress)
        try:
            for batch in batches():
                if max_rows is not None and done + len(batch["id"]) > max_rows:
                    batch = {k: v[: max_rows - done] for k, v in batch.items()}
                full = l2_normalize(np.asarray(batch["embedding"], dtype=np.float32))
                self._upsert(pair, batch, full, wanted.coarse_dim)
                writer.append(np.asarray(batch["id"], dtype=np.int64), full)
                for r in range(-done % stride, len(full), stride):
                    self._sample[int(batch["id"][r])] = full[r]
                done += len(batch["id"])
                bar.update(len(batch["id"]))
                if max_rows is not None and done >= max_rows:
                    break
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        with ThreadPoolExecutor(2) as pool:  # a server's flush waits for its segments to seal (seconds each)
            list(pool.map(self._client.flush, pair))
        if max_rows is not None and done < total:
            writer.abort()
            return done
        writer.finish(wanted.digest)
        return done

    def _verify(self, pair: tuple[str, str], wanted: IndexInfo) -> None:
        """A new version serves only after this passes: row counts (Strong consistency) equal the
        export's, sampled rows read back equal what was written (both collections and the local
        store, whose files also hash as written), and a probe search finds a sampled row first."""
        coarse, fine = pair
        want = {k: wanted.expected.get(k, 0) for k in KINDS}
        for label, got in self._counts_of(pair).items():
            if got != want:
                raise MilvusError(
                    f"{coarse if label == 'coarse' else fine} at {self.uri} holds {got} rows after the build, "
                    f"expected {want} from the export; the served version is unchanged, re-run `hivlp index`"
                )
        ids = sorted(self._sample)
        expect = np.stack([self._sample[i] for i in ids])
        for coll, vecs in ((fine, expect), (coarse, l2_normalize(expect[:, : wanted.coarse_dim]))):
            rows = self._client.query(coll, filter=f"id in {ids}", output_fields=[VECTOR], consistency_level="Strong")
            got = {int(r["id"]): np.asarray(r[VECTOR], dtype=np.float32) for r in rows}
            bad = [i for i, v in zip(ids, vecs) if i not in got or not np.allclose(got[i], v, atol=1e-5)]
            if bad:
                raise MilvusError(f"{coll} at {self.uri}: {len(bad)} sampled rows read back differ (first id "
                                  f"{bad[0]}); the served version is unchanged, re-run `hivlp index`")
        store = VectorStore.open(self.store_dir, coarse[: -len("_coarse")], wanted.digest,
                                 sum(wanted.expected.values()), wanted.dim)
        if store is None:
            raise MilvusError(f"vector store {self.store_dir} lacks the files of {coarse} just written")
        store.verify()
        vecs, found = store.get(np.asarray(ids))
        if not found.all() or not np.allclose(vecs, expect, atol=1e-6):
            raise MilvusError(f"vector store {self.store_dir}: sampled rows differ from what was written")
        probe = ids[0]
        kind = self._client.query(coarse, filter=f"id == {probe}", output_fields=["kind"],
                                  consistency_level="Strong")[0]["kind"]
        cand, scores = self._coarse_hits(coarse, l2_normalize(expect[:1, : wanted.coarse_dim]), 1, kind, wanted,
                                         None, "Strong")
        if not len(cand[0]) or cand[0][0] < 0 or scores[0][0] < 0.999:
            raise MilvusError(f"probe search of {coarse} at {self.uri} did not find row {probe} first; "
                              "the served version is unchanged, re-run `hivlp index`")

    def _swap(self, pair: tuple[str, str]) -> None:
        """Point the aliases at `pair`: the fine alias first, the coarse one (what searches resolve) last."""
        for alias in (self.alias_coarse, self.alias_fine):
            if self._alias_target(alias) is None and self._client.has_collection(alias):
                log.warning("replacing %s, built before versioned collections: searches fail until the "
                            "aliases exist (this once)", alias)
                self._client.drop_collection(alias)
        for alias, coll in ((self.alias_fine, pair[1]), (self.alias_coarse, pair[0])):
            if self._alias_target(alias) is None:
                self._client.create_alias(coll, alias)
            else:
                self._client.alter_alias(coll, alias)
        with self._lock:
            self._served, self._served_at = pair, time.monotonic()
        log.info("index %r at %s now serves %s", self.name, self.uri, pair[0])

    def _prune(self, keep: int, served: tuple[str, str]) -> None:
        """Drop versions older than the `keep` newest previous complete ones, and incomplete ones."""
        older = [v for v in self.versions() if self.version_names(v)[0] != served[0]]
        kept = 0
        for v in sorted(older, reverse=True):
            pair = self.version_names(v)
            info = None
            with contextlib.suppress(MilvusError):
                info = self._read_pair_info(pair)
            if info is not None and info.complete and kept < keep:
                kept += 1
                continue
            self._drop_pair(pair)

    def _drop_stale(self, served: tuple[str, str] | None, building: tuple[str, str] | None) -> None:
        """Incomplete versions of other content (builds that died) are dropped before a new build."""
        for v in self.versions():
            pair = self.version_names(v)
            if (served and pair[0] == served[0]) or (building and pair[0] == building[0]):
                continue
            info = None
            with contextlib.suppress(MilvusError):
                info = self._read_pair_info(pair)
            if info is None or not info.complete:
                self._drop_pair(pair)

    def _drop_pair(self, pair: tuple[str, str]) -> None:
        for c in pair:
            if self._client.has_collection(c):
                self._client.drop_collection(c)
            self._loaded.discard(c)
        vs.remove(self.store_dir, pair[0][: -len("_coarse")])
        self._infos.pop(pair[0], None)
        self._stores.pop(pair[1], None)

    def _create(self, pair: tuple[str, str], info: IndexInfo) -> None:
        """Both collections of a new version. No nullable fields (a Milvus 2.3 server has none):
        missing imgid/sentid are stored as -1, missing filename/caption as ""."""
        from pymilvus import DataType, MilvusClient

        for coll, dim in ((pair[1], info.dim), (pair[0], info.coarse_dim)):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("kind", DataType.VARCHAR, max_length=8)
            schema.add_field("imgid", DataType.INT64)
            schema.add_field("sentid", DataType.INT64)
            schema.add_field("filename", DataType.VARCHAR, max_length=1024)
            schema.add_field("caption", DataType.VARCHAR, max_length=65535)
            schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=dim)
            self._client.create_collection(
                coll, schema=schema, properties=info.properties(), consistency_level=SERVING_CONSISTENCY
            )
            for kind in KINDS:
                self._client.create_partition(coll, kind)
        # Indexed from the start, so an interrupted build can be loaded and counted (Milvus queries
        # only loaded collections, and loads only indexed ones).
        self._ensure_indexes(pair, info, load=False)

    def _mark(self, pair: tuple[str, str], complete: bool) -> None:
        """Set hivlp.complete; when marking complete, the fine collection goes first, the coarse last."""
        value = {"hivlp.complete": "true" if complete else "false"}
        order = (pair[1], pair[0]) if complete else pair
        for c in order:
            self._client.alter_collection_properties(c, properties=value)

    def _upsert(self, pair: tuple[str, str], batch: RowBatch, full: np.ndarray, coarse_dim: int) -> None:
        vectors = {pair[1]: full, pair[0]: l2_normalize(full[:, :coarse_dim])}
        kinds = np.asarray(batch["kind"])
        fill = {"imgid": -1, "sentid": -1, "filename": "", "caption": ""}
        for kind in KINDS:
            sel = np.flatnonzero(kinds == kind)
            if not len(sel):
                continue
            meta = [
                {"id": int(batch["id"][i]), "kind": kind,
                 **{f: fill[f] if batch[f][i] is None else batch[f][i] for f in fill}}
                for i in sel.tolist()
            ]
            for coll, vecs in vectors.items():
                rows = [dict(m, **{VECTOR: vecs[i]}) for m, i in zip(meta, sel.tolist())]
                self._client.upsert(coll, rows, partition_name=kind)

    def _ensure_indexes(self, pair: tuple[str, str], info: IndexInfo, load: bool = True) -> None:
        n = sum(info.expected.values())
        specs = {pair[0]: _index_params(info.index_type, n), pair[1]: ("FLAT", {})}
        for coll, (itype, params) in specs.items():
            if not self._client.list_indexes(coll, field_name=VECTOR):
                ip = self._client.prepare_index_params()
                ip.add_index(field_name=VECTOR, index_type=itype, metric_type="IP", params=params)
                with _quiet_milvus_logs():  # Lite lacks AllocTimestamp; pymilvus copes but logs it
                    self._client.create_index(coll, ip)
        if load:
            self._wait_indexed(pair)
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(self._load, pair))

    def _wait_indexed(self, pair: tuple[str, str], timeout: float = INDEX_WAIT_S) -> None:
        """Wait until a server has built the index of every flushed row (it builds them in the
        background after a flush; until then searches scan unindexed segments)."""
        t0 = time.monotonic()
        for coll in pair:
            while True:
                d = self._client.describe_index(coll, VECTOR)
                total, done = d.get("total_rows"), d.get("indexed_rows")
                if total is None or done is None or (done >= total and not d.get("pending_index_rows")):
                    break
                if time.monotonic() - t0 > timeout:
                    raise MilvusError(f"{coll} at {self.uri}: index built for {done} of {total} rows after "
                                      f"{timeout:g} s; the served version is unchanged, re-run `hivlp index`")
                time.sleep(0.5)

    def _load(self, coll: str) -> None:
        """Load a collection once per client (a repeated load call still costs a round trip or more)."""
        if coll not in self._loaded:
            self._client.load_collection(coll)
            self._loaded.add(coll)

    def drop(self) -> None:
        """Drop the aliases, every version and its vector store, and a pre-versioning pair."""
        for alias in (self.alias_coarse, self.alias_fine):
            if self._alias_target(alias) is not None:
                self._client.drop_alias(alias)
            elif self._client.has_collection(alias):
                self._client.drop_collection(alias)
        for v in self.versions():
            self._drop_pair(self.version_names(v))
        with self._lock:
            self._served, self._served_at = None, -np.inf
        self._infos.clear()
        self._stores.clear()

    # ---------------------------------------------------------------- search

    def _retry(self, fn: Callable[[], Any]) -> Any:
        """Run a search; if it fails because the cached version went away (re-indexed, dropped),
        resolve the aliases again and run it once more on the version served now."""
        from pymilvus.exceptions import MilvusException

        before = self._served
        try:
            with _quiet_milvus_logs():
                return fn()
        except MilvusException:
            if self.served(refresh=True) == before:
                raise
        with _quiet_milvus_logs():
            return fn()

    def _caps(self, k: int, shortlist: int, kind: str, info: IndexInfo) -> tuple[int, int]:
        """k and shortlist capped at the rows of `kind` and Milvus's top-k limit, with a warning."""
        if k < 1 or shortlist < 1:
            raise UsageError(f"k and shortlist must be >= 1, got k={k}, shortlist={shortlist}")
        top = min(info.expected[kind], MAX_TOPK)
        if k > top:
            log.warning("k capped at %d (%s rows: %d, Milvus top-k limit %d; asked for %d)",
                        top, kind, info.expected[kind], MAX_TOPK, k)
            k = top
        if shortlist > top:
            log.warning("shortlist capped at %d (%s rows: %d, Milvus top-k limit %d; asked for %d)",
                        top, kind, info.expected[kind], MAX_TOPK, shortlist)
            shortlist = top
        return int(k), max(int(shortlist), int(k))

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        shortlist: int = 100,
        kind: str = "image",
        ef: int | None = None,
        timings: dict[str, float] | None = None,
    ) -> SearchResult:
        """Coarse ANN search (top `shortlist` of `kind`), full vectors of the shortlist (local store,
        else fetched by id from the fine collection), re-rank, top k.

        k and shortlist are capped at the rows of `kind` and at MAX_TOPK (with a warning); a query the
        ANN index returns fewer than k candidates for is padded with id -1 and score -inf. Queries run
        in blocks whose gathered full vectors stay under _GATHER_BLOCK floats. `ef` overrides the HNSW
        search breadth (see `_search_params`). `timings`, when given, receives milliseconds: "coarse"
        (the ANN search), "fetch" (getting the full vectors), "score" and "rerank" (fetch + score).
        """
        return self._retry(lambda: self._search(queries, k, shortlist, kind, ef, timings))

    def _search(self, queries, k, shortlist, kind, ef, timings) -> SearchResult:
        info, coarse, fine = self._serving()
        q = self._check_queries(queries, kind, info)
        k, shortlist = self._caps(k, shortlist, kind, info)
        full = l2_normalize(q)
        qc = l2_normalize(q[:, : info.coarse_dim])
        store = self._store(fine, info)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        spent = {"coarse": 0.0, "fetch": 0.0, "score": 0.0}
        step = max(1, min(_SEARCH_CHUNK, _GATHER_BLOCK // (shortlist * info.dim)))
        for a in range(0, len(q), step):
            t0 = time.perf_counter()
            cand, _ = self._coarse_hits(coarse, qc[a : a + step], shortlist, kind, info, ef)
            t1 = time.perf_counter()
            vecs, found = store.get(cand) if store is not None else (None, None)
            if store is None or not found[cand >= 0].all():
                vecs, found = self._fetch_vectors(fine, cand)
            t2 = time.perf_counter()
            s = np.matmul(vecs, full[a : a + step, :, None])[..., 0]
            s[~found] = -np.inf
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            top_s = np.take_along_axis(s, top, axis=1)
            top_i = np.where(np.isfinite(top_s), np.take_along_axis(cand, top, axis=1), -1)
            ids[a : a + step, : top.shape[1]] = top_i
            scores[a : a + step, : top.shape[1]] = top_s
            t3 = time.perf_counter()
            spent["coarse"] += t1 - t0
            spent["fetch"] += t2 - t1
            spent["score"] += t3 - t2
        if timings is not None:
            timings.update({key: 1000 * v for key, v in spent.items()})
            timings["rerank"] = timings["fetch"] + timings["score"]
            timings["store"] = 1.0 if store is not None else 0.0
        return SearchResult(ids=ids, scores=scores)

    def _store(self, fine: str, info: IndexInfo) -> VectorStore | None:
        """The local full-vector store of the served version, or None (then vectors come from `fine`)."""
        if fine not in self._stores:
            store = VectorStore.open(self.store_dir, fine[: -len("_fine")], info.digest,
                                     sum(info.expected.values()), info.dim)
            if store is None:
                log.info("no local vector store for %s under %s: the re-rank fetches full vectors from Milvus",
                         fine, self.store_dir)
            self._stores[fine] = store
        return self._stores[fine]

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

    def search_coarse(
        self, queries: np.ndarray, k: int = 10, kind: str = "image", ef: int | None = None
    ) -> SearchResult:
        """The coarse level alone: ANN search of the coarse collection (no re-rank). Scores are cosines
        of the `coarse_dim` prefix; an index built with coarse_dim = dim is a single full-dim collection."""
        return self._retry(lambda: self._search_coarse(queries, k, kind, ef))

    def _search_coarse(self, queries, k, kind, ef) -> SearchResult:
        info, coarse, _ = self._serving()
        q = self._check_queries(queries, kind, info)
        k, _ = self._caps(k, k, kind, info)
        qc = l2_normalize(q[:, : info.coarse_dim])
        out_ids = np.full((len(q), k), -1, dtype=np.int64)
        out_scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        step = max(1, min(_SEARCH_CHUNK, _GATHER_BLOCK // k))
        for a in range(0, len(q), step):
            out_ids[a : a + step], out_scores[a : a + step] = self._coarse_hits(coarse, qc[a : a + step], k, kind,
                                                                                info, ef)
        return SearchResult(ids=out_ids, scores=out_scores)

    def _coarse_hits(self, coarse: str, qc: np.ndarray, limit: int, kind: str, info: IndexInfo,
                     ef: int | None, consistency: str = SERVING_CONSISTENCY) -> tuple[np.ndarray, np.ndarray]:
        """One ANN search call: ids [b, limit] (-1 padded) and scores [b, limit] (-inf padded)."""
        params = _search_params(info.index_type, limit, sum(info.expected.values()), ef)
        kw: dict[str, Any] = {"consistency_level": consistency}
        if len(info.kinds) > 1:
            kw["partition_names"] = [kind]
        if self._lite:
            kw["output_fields"] = ["id"]  # else Milvus Lite ships every stored field back with the hits
        return ann_search(self._client, coarse, list(qc), limit, params, **kw)

    def _fetch_vectors(self, fine: str, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full vectors of an id array [b, K] (-1 = none) fetched by id from the fine collection."""
        uniq = np.unique(cand[cand >= 0])
        dim = self._infos[self._served[0]].dim if self._served and self._served[0] in self._infos else None
        vecs_u: np.ndarray | None = None
        for s in range(0, len(uniq), _GET_CHUNK):
            chunk = uniq[s : s + _GET_CHUNK]
            rows = self._client.get(fine, ids=chunk.tolist(), output_fields=[VECTOR])
            if len(rows) != len(chunk):
                raise IndexNotReadyError(
                    f"{fine} at {self.uri} lacks {len(chunk) - len(rows)} ids found in the coarse "
                    f"collection; re-run `hivlp index --uri {self.uri} --name {self.name}`"
                )
            got = np.array([r["id"] for r in rows], dtype=np.int64)
            block = np.asarray([r[VECTOR] for r in rows], dtype=np.float32)
            if vecs_u is None:
                vecs_u = np.empty((len(uniq), dim or block.shape[1]), dtype=np.float32)
            vecs_u[s + np.searchsorted(chunk, got)] = block
        d = vecs_u.shape[1] if vecs_u is not None else (dim or 1)
        found = cand >= 0
        out = np.zeros((*cand.shape, d), dtype=np.float32)
        if vecs_u is not None:
            out[found] = vecs_u[np.searchsorted(uniq, cand[found])]
        return out, found

    def describe(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Display metadata (kind, imgid, sentid, filename, caption) of ids, keyed by id (the -1 / ""
        stored for a missing value reads back as None)."""
        wanted = [int(i) for i in ids if int(i) >= 0]

        def run() -> dict[int, dict[str, Any]]:
            _, coarse, _ = self._serving()
            out: dict[int, dict[str, Any]] = {}
            for s in range(0, len(wanted), _GET_CHUNK):
                for r in self._client.get(coarse, ids=wanted[s : s + _GET_CHUNK], output_fields=META_FIELDS):
                    out[int(r["id"])] = {f: _missing_as_none(f, r.get(f)) for f in META_FIELDS}
            return out

        return self._retry(run)


def _missing_as_none(field: str, value: Any) -> Any:
    if value is None or (field in ("imgid", "sentid") and value == -1) or (field in ("filename", "caption")
                                                                            and value == ""):
        return None
    return value


def default_store_dir(uri: str) -> Path:
    """Where the local full-vector store of an index at `uri` lives: $HIVLP_VECTOR_STORE if set, else
    beside a Lite file (`<db>.vectors/`), else `outputs/milvus/vectors/<host>_<port>/` for a server."""
    env = os.environ.get(STORE_ENV)
    if is_lite_uri(uri):
        return Path(env) / Path(uri).name if env else Path(str(uri) + ".vectors")
    host = re.sub(r"[^A-Za-z0-9.-]+", "_", uri.split("://", 1)[-1]).strip("_")
    return (Path(env) if env else Path("outputs/milvus/vectors")) / host


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


def ann_search(client, collection: str, data: list, limit: int, params: dict[str, Any],
               consistency_level: str = SERVING_CONSISTENCY, partition_names: list[str] | None = None,
               output_fields: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One ANN search call: ids [b, limit] (-1 padded) and scores [b, limit] (-inf padded).

    The request is built by pymilvus's own `Prepare` and sent through the client's gRPC stub (its
    channel, so its credentials), and the hits are read from the response as two arrays.
    `MilvusClient.search` makes the same request but turns every hit into a Python object: 0.6 ms
    of a 2.3 ms call on a 1,000-row collection and 1.2 of 3.5 ms for 200 hits on this machine (README,
    "Served coarse-to-fine"). Failures raise MilvusException as `MilvusClient.search` does.
    """
    from pymilvus.exceptions import MilvusException

    try:
        import grpc
        from pymilvus.client import ts_utils
        from pymilvus.client.call_context import _api_level_md
        from pymilvus.client.prepare import Prepare
        from pymilvus.client.utils import check_status

        conn = client._get_connection()
        stub = conn._stub
        metadata = _api_level_md(client._generate_call_context())
    except (ImportError, AttributeError) as e:  # another pymilvus than the lock's: its public call
        log.debug("lean search unavailable (%s); using MilvusClient.search", e)
        return _client_search(client, collection, data, limit, params, consistency_level, partition_names,
                              output_fields)
    kw: dict[str, Any] = {"consistency_level": consistency_level}
    default = ts_utils.construct_guarantee_ts(collection, kw, conn.server_address, "")
    request = Prepare.search_requests_with_expr(
        collection_name=collection, anns_field=VECTOR, param=params, limit=limit, data=data, ids=None,
        expr="", partition_names=partition_names, output_fields=output_fields, round_decimal=-1,
        use_default_consistency=default, **kw)
    try:
        response = stub.Search(request, metadata=metadata)
    except grpc.RpcError as e:
        raise MilvusException(message=f"search of {collection} failed: {e.code().name} {e.details()}") from None
    check_status(response.status)
    res = response.results
    topks = np.asarray(res.topks, dtype=np.int64)
    nq = len(data)
    if len(topks) != nq:
        raise MilvusException(message=f"search of {collection} answered {len(topks)} queries of {nq}")
    flat_ids = np.asarray(res.ids.int_id.data, dtype=np.int64)
    flat_scores = np.asarray(res.scores, dtype=np.float32)
    query = np.repeat(np.arange(nq), topks)
    rank = np.arange(len(query)) - np.repeat(np.cumsum(topks) - topks, topks)
    keep = rank < limit
    ids = np.full((nq, limit), -1, dtype=np.int64)
    scores = np.full((nq, limit), -np.inf, dtype=np.float32)
    ids[query[keep], rank[keep]] = flat_ids[keep]
    scores[query[keep], rank[keep]] = flat_scores[keep]
    return ids, scores


def _client_search(client, collection, data, limit, params, consistency_level, partition_names, output_fields):
    """`ann_search` through `MilvusClient.search` (the public call)."""
    kw: dict[str, Any] = {"consistency_level": consistency_level}
    if partition_names:
        kw["partition_names"] = partition_names
    if output_fields:
        kw["output_fields"] = output_fields
    hits = client.search(collection, data=data, limit=limit, anns_field=VECTOR, search_params=params, **kw)
    ids = np.full((len(data), limit), -1, dtype=np.int64)
    scores = np.full((len(data), limit), -np.inf, dtype=np.float32)
    for i, row in enumerate(hits):
        got = np.asarray(row.ids, dtype=np.int64)[:limit]  # `row.ids` skips per-hit decoding
        ids[i, : len(got)] = got
        scores[i, : len(got)] = np.asarray(row.distances, dtype=np.float32)[: len(got)]
    return ids, scores


def _search_params(index_type: str, limit: int, n: int, ef: int | None) -> dict[str, Any]:
    """Search breadth of the coarse ANN pass. `ef` (an explicit override) is HNSW's ef or IVF's nprobe.

    Defaults, from bench/results/milvus_server.json (N = 100k, 64-d coarse prefix): HNSW ef =
    max(limit, HNSW_EF); IVF_FLAT nprobe = IVF_NPROBE (capped at nlist). The re-rank cannot recover a
    candidate the shortlist missed; on that (synthetic) gallery ef 256 with a shortlist of 200 kept
    0.991 of the exact top 10, IVF needed more than nprobe 64."""
    if index_type == "HNSW":
        ef = max(ef, limit) if ef is not None else max(limit, HNSW_EF)
        return {"metric_type": "IP", "params": {"ef": min(ef, 32768)}}
    if index_type == "IVF_FLAT":
        nprobe = ef if ef is not None else IVF_NPROBE
        return {"metric_type": "IP", "params": {"nprobe": int(np.clip(nprobe, 1, _nlist(n)))}}
    return {"metric_type": "IP", "params": {}}
