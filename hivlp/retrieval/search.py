"""Search an index with a caption or an image: what `hivlp search` and `hivlp serve` call.

A query is encoded once (by a checkpoint, or by a model registered in MLflow), searched in an index
(the Milvus dual-collection index, or `ExportIndex`, an export folder in memory: both have `info`,
`search`, `search_coarse` and `describe`), and the hits are returned with their display metadata and
the time each stage took. Text queries search images, image queries search captions.

Two levels answer a query: "fine" (coarse-to-fine: a shortlist from the coarse prefix, re-ranked with
the full vectors) and "coarse" (the coarse prefix alone), so a person can see what the re-rank changes.
Encoders are shared by a server's threads (the text tower tokenises one call at a time; the forward
passes run concurrently).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hivlp.errors import UsageError

log = logging.getLogger(__name__)

# A caption query longer than this is cut (the text tower reads only its first few dozen tokens).
MAX_QUERY_CHARS = 1000
# "fine": coarse shortlist re-ranked with the full vectors; "coarse": the coarse prefix alone.
LEVELS = ("fine", "coarse")


class QueryEncoder(Protocol):
    """What search needs from a model: full-dim embeddings of captions and of image files."""

    source: str
    weights_sha256: str | None

    def texts(self, captions: list[str]) -> np.ndarray: ...

    def images(self, paths: list[str]) -> np.ndarray: ...


@dataclass
class CheckpointQueryEncoder:
    """Queries encoded by a checkpoint folder (the one path: `hivlp.model.encode.load_encoder`)."""

    checkpoint: str | Path
    device: str = "cpu"

    def __post_init__(self) -> None:
        from hivlp.model.encode import load_encoder

        self._encoder = load_encoder(self.checkpoint, device=self.device)
        self.source = str(self.checkpoint)
        self.weights_sha256: str | None = self._encoder.weights_sha256
        self.dim: int = self._encoder.dim

    def texts(self, captions: list[str]) -> np.ndarray:
        return self._encoder.texts(captions, progress=False)

    def images(self, paths: list[str]) -> np.ndarray:
        return self._encoder.images(paths, batch_size=len(paths), num_workers=0, progress=False)


@dataclass
class RegisteredQueryEncoder:
    """Queries encoded by a model in the MLflow registry, e.g. `models:/hivlp@champion`."""

    model_uri: str
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        from hivlp.registry import load_pyfunc

        self._model = load_pyfunc(self.model_uri, self.tracking_uri)
        self.source = self.model_uri
        self.weights_sha256 = (self._model.metadata.metadata or {}).get("hivlp_weights_sha256")

    def _predict(self, column: str, values: list[str]) -> np.ndarray:
        import pandas as pd

        return np.asarray(self._model.predict(pd.DataFrame({column: values})), dtype=np.float32)

    def texts(self, captions: list[str]) -> np.ndarray:
        return self._predict("text", captions)

    def images(self, paths: list[str]) -> np.ndarray:
        return self._predict("image_path", paths)


def query_encoder(checkpoint: str | Path | None = None, model_uri: str | None = None, device: str = "cpu") -> QueryEncoder:
    """The encoder for `checkpoint` or `model_uri` (exactly one)."""
    if (checkpoint is None) == (model_uri is None):
        raise UsageError("give exactly one of a checkpoint folder and a registered model URI")
    if model_uri is not None:
        return RegisteredQueryEncoder(model_uri)
    return CheckpointQueryEncoder(checkpoint, device=device)


@dataclass
class Hit:
    rank: int
    id: int
    score: float
    kind: str | None = None
    imgid: int | None = None
    sentid: int | None = None
    filename: str | None = None
    caption: str | None = None


@dataclass
class SearchResponse:
    """Top hits of one query, best first, and milliseconds per stage."""

    query: dict[str, str | None]
    searched: str  # the kind of item searched: "image" for a text query, "text" for an image query
    hits: list[Hit]
    timings_ms: dict[str, float] = field(default_factory=dict)  # encode, coarse, rerank, describe, total
    notes: list[str] = field(default_factory=list)  # what was changed about the request, and why
    level: str = "fine"  # "fine" (coarse-to-fine) or "coarse" (the coarse prefix alone)
    k: int = 0  # the k and shortlist used, after capping (no shortlist at level "coarse")
    shortlist: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "searched": self.searched, "level": self.level, "k": self.k,
                "shortlist": self.shortlist, "hits": [asdict(h) for h in self.hits],
                "timings_ms": self.timings_ms, "notes": self.notes}


def check_text_query(text: str) -> tuple[str, list[str]]:
    """(the caption to encode, notes): an empty caption is refused, an overlong one is cut."""
    text = text.strip()
    if not text:
        raise UsageError("the query text is empty; give a caption to search for, e.g. 'a dog runs on the grass'")
    if len(text) > MAX_QUERY_CHARS:
        return text[:MAX_QUERY_CHARS], [
            f"query text truncated from {len(text)} to {MAX_QUERY_CHARS} characters "
            "(the text tower reads only the first few dozen tokens anyway)"
        ]
    return text, []


def cap_request(
    k: int, shortlist: int, rows: int, max_k: int | None = None, max_shortlist: int | None = None
) -> tuple[int, int, list[str]]:
    """(k, shortlist, notes): both at least 1, k at most the rows searched, the shortlist at least k and
    at most the rows and Milvus's own top-k limit, so no request allocates past what exists. A server
    passes its own limits too (`max_k`, `max_shortlist`)."""
    from hivlp.retrieval.milvus import MAX_TOPK

    if k < 1 or shortlist < 1:
        raise UsageError(f"k and shortlist must be >= 1, got k={k}, shortlist={shortlist}")
    notes = []
    k_limits = [(rows, "the number of items searched")]
    if max_k is not None:
        k_limits.append((max_k, "this server's limit"))
    k_top, why = min(k_limits, key=lambda c: c[0])
    if k > k_top:
        notes.append(f"k capped at {k_top}, {why} (asked for {k})")
        k = k_top
    s_limits = [(rows, "the number of items searched"), (MAX_TOPK, "Milvus top-k limit")]
    if max_shortlist is not None:
        s_limits.append((max_shortlist, "this server's limit"))
    top, why = min(s_limits, key=lambda c: c[0])
    if shortlist > top:
        notes.append(f"shortlist capped at {top} ({why}; asked for {shortlist})")
        shortlist = top
    return k, max(shortlist, k), notes


def check_query_matches_index(query_dim: int, index_dim: int, source: str, where: str) -> None:
    from hivlp.retrieval.milvus import DimensionMismatchError

    if query_dim != index_dim:
        raise DimensionMismatchError(
            f"the model {source} makes {query_dim}-d embeddings but {where} holds {index_dim}-d vectors; "
            "search with the model the index was built from, or re-run `hivlp export` and `hivlp index` with this one"
        )


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise UsageError(f"level {level!r}: choose 'fine' (coarse-to-fine) or 'coarse' (the coarse prefix alone)")
    return level


def search(
    index: Any,
    encoder: QueryEncoder,
    text: str | None = None,
    image: str | Path | None = None,
    k: int = 10,
    shortlist: int = 100,
    level: str = "fine",
    max_k: int | None = None,
    max_shortlist: int | None = None,
) -> SearchResponse:
    """Encode one query (a caption or an image file) and search an index at `level` (see LEVELS).

    Timings (ms): encode, coarse (the coarse pass), rerank (fetching and scoring the shortlist's full
    vectors; 0 at level "coarse"), describe (display metadata of the hits) and total. `max_k` and
    `max_shortlist` cap the request further (a server's limits; see `cap_request`).
    """
    if (text is None) == (image is None):
        raise UsageError("give exactly one query: a caption (text) or an image file")
    check_level(level)
    notes: list[str] = []
    if text is not None:
        text, notes = check_text_query(text)
    t0 = time.perf_counter()
    info = index.info()  # fails fast (missing or incomplete index) before encoding
    kind = "image" if text is not None else "text"
    k, shortlist, capped = cap_request(k, shortlist, info.expected[kind], max_k, max_shortlist)
    notes += capped
    query = encoder.texts([text]) if text is not None else encoder.images([str(image)])
    t_encoded = time.perf_counter()
    check_query_matches_index(query.shape[1], info.dim, encoder.source, f"index {info.name!r} at {info.uri}")
    if encoder.weights_sha256 and info.weights_sha256 not in ("arrays", encoder.weights_sha256):
        log.warning(
            "index %r was built from other weights (sha256 %s...) than %s; results may be meaningless",
            info.name, info.weights_sha256[:12], encoder.source,
        )
    stages: dict[str, float] = {}
    if level == "coarse":
        result = index.search_coarse(query, k=k, kind=kind)
        stages = {"coarse": 1000 * (time.perf_counter() - t_encoded), "rerank": 0.0}
    else:
        result = index.search(query, k=k, shortlist=shortlist, kind=kind, timings=stages)
    t_searched = time.perf_counter()
    ids, scores = result.ids[0], result.scores[0]
    meta = index.describe(ids)
    hits = [
        Hit(rank=r + 1, id=int(i), score=float(s), **meta.get(int(i), {}))
        for r, (i, s) in enumerate(zip(ids, scores)) if i >= 0
    ]
    t_done = time.perf_counter()
    timings = {"encode": 1000 * (t_encoded - t0), "coarse": stages["coarse"], "rerank": stages["rerank"],
               "describe": 1000 * (t_done - t_searched), "total": 1000 * (t_done - t0)}
    return SearchResponse(
        query={"text": text, "image": None if image is None else str(image)}, searched=kind, hits=hits,
        timings_ms={key: round(v, 3) for key, v in timings.items()}, notes=notes, level=level, k=k,
        shortlist=shortlist if level == "fine" else None,
    )
