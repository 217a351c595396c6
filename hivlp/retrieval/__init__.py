"""Retrieval: Recall@K metrics, in-memory exact and coarse-to-fine search, evaluation of a split.

The Milvus dual-collection index, behind the same `SearchEngine` interface, is `hivlp.retrieval.milvus`
(imported on demand: it needs pymilvus).
"""

from hivlp.retrieval.evaluate import (
    evaluate_checkpoint,
    evaluate_embeddings,
    format_table,
)
from hivlp.retrieval.inmemory import (
    CoarseToFineEngine,
    ExactEngine,
    SearchEngine,
    SearchResult,
)
from hivlp.retrieval.metrics import recall_from_embeddings, recall_metrics

__all__ = [
    "CoarseToFineEngine",
    "ExactEngine",
    "SearchEngine",
    "SearchResult",
    "evaluate_checkpoint",
    "evaluate_embeddings",
    "format_table",
    "recall_from_embeddings",
    "recall_metrics",
]
