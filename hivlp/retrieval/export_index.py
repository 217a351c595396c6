"""An export folder searched in memory, behind the methods `hivlp.retrieval.search` calls on a Milvus
index (`info`, `search`, `search_coarse`, `describe`), so `hivlp serve` and tests can search an export
without a Milvus database, through the very same `search()`.

One `CoarseToFineEngine` per kind (fp32 codes of the `coarse_dim` prefix, re-rank with the full
vectors): the in-memory twin of `<name>_coarse` + `<name>_fine`. The export's checksums are verified
on load (`hivlp.embeddings.format.load_embeddings`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hivlp.embeddings.format import (
    batch_embeddings,
    load_embeddings,
    manifest_digest,
    read_manifest,
)
from hivlp.errors import UsageError
from hivlp.retrieval.inmemory import (
    DEFAULT_COARSE_DIM,
    CoarseToFineEngine,
    SearchResult,
)
from hivlp.retrieval.milvus import KINDS, IndexInfo

log = logging.getLogger(__name__)

META_FIELDS = ("kind", "imgid", "sentid", "filename", "caption")


class ExportIndex:
    """A complete export folder (`hivlp export`), loaded into memory for coarse-to-fine search."""

    def __init__(self, embeddings_dir: str | Path, coarse_dim: int = DEFAULT_COARSE_DIM, name: str | None = None) -> None:
        d = Path(embeddings_dir)
        manifest = read_manifest(d)
        if not manifest["complete"]:
            raise UsageError(
                f"{d}: export incomplete, shards {manifest['missing_shards']} of {manifest['num_shards']} "
                "missing; finish `hivlp export` before serving it"
            )
        if not 0 < coarse_dim <= manifest["dim"]:
            raise UsageError(f"coarse dim {coarse_dim}: must be between 1 and the embedding dim {manifest['dim']}")
        if coarse_dim not in manifest["levels"]:
            log.warning("coarse dim %d is not a trained level %s of this model", coarse_dim, manifest["levels"])
        table = load_embeddings(d)
        emb = batch_embeddings(table)
        ids = np.asarray(table.column("id").to_pylist(), dtype=np.int64)
        kinds = np.asarray(table.column("kind").to_pylist())
        columns = {f: table.column(f).to_pylist() for f in META_FIELDS}
        self._meta = {int(i): {f: columns[f][r] for f in META_FIELDS} for r, i in enumerate(ids.tolist())}
        self._engines = {}
        for kind in KINDS:
            sel = np.flatnonzero(kinds == kind)
            if len(sel):
                self._engines[kind] = CoarseToFineEngine(emb[sel], ids[sel], coarse_dim=coarse_dim, codes="fp32")
        self.manifest = manifest
        self._info = IndexInfo(
            name=name or d.name, uri=str(d), dim=int(manifest["dim"]), coarse_dim=int(coarse_dim),
            index_type="in-memory fp32", weights_sha256=manifest["weights_sha256"],
            digest=manifest_digest(manifest),
            kinds=tuple(self._engines), expected={k: int(manifest["counts"][k]) for k in self._engines},
            complete=True,
        )

    def info(self) -> IndexInfo:
        return self._info

    def _engine(self, kind: str) -> CoarseToFineEngine:
        if kind not in self._engines:
            raise UsageError(f"export {self._info.uri} holds {list(self._engines)} rows, not {kind!r}")
        return self._engines[kind]

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        shortlist: int = 100,
        kind: str = "image",
        timings: dict[str, float] | None = None,
    ) -> SearchResult:
        """Coarse-to-fine: top `shortlist` of `kind` by the prefix, re-ranked with the full vectors."""
        return self._engine(kind).search(queries, k, shortlist=shortlist, timings=timings)

    def search_coarse(self, queries: np.ndarray, k: int = 10, kind: str = "image") -> SearchResult:
        """The coarse level alone: top k of `kind` by the cosine of the `coarse_dim` prefix."""
        return self._engine(kind).search_coarse(queries, k)

    def describe(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Display metadata (kind, imgid, sentid, filename, caption) of the ids the export holds."""
        return {int(i): dict(self._meta[int(i)]) for i in ids if int(i) in self._meta}

    def close(self) -> None:
        """Nothing to release (the Milvus index's twin method)."""

    def __enter__(self) -> ExportIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
