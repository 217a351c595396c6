"""Index the exported shards in Milvus (`hivlp index`): `<name>_coarse` + `<name>_fine` collections."""

from typing import List

from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components.base import hivlp_component


@hivlp_component
def index_embeddings(
    embeddings: Input[List[Dataset]],
    milvus_uri: str,
    summary: Output[Artifact],
    metrics: Output[Metrics],
    name: str = "hivlp",
    coarse_dim: int = 64,
    index_type: str = "HNSW",
):
    """Gather the shard artifacts of the fan-out into one export folder and upsert it (idempotent).

    The Milvus token, if the server needs one, comes from $MILVUS_TOKEN (a Kubernetes secret).

    Args:
        embeddings: The shards of one export (all tasks of the fan-out).
        milvus_uri: Milvus server (http://host:19530) or a Milvus Lite file.
        name: Collection name prefix: `<name>_coarse` and `<name>_fine`.
        coarse_dim: Dimensions of the coarse collection.
        index_type: Milvus index of the coarse collection.

    Returns:
        summary: What was indexed (counts, upserts, seconds) as JSON.
        metrics: Rows per collection, upserts, seconds.
    """
    import tempfile

    from hivlp.embeddings.format import gather_shards
    from hivlp.io import atomic_write_json
    from hivlp.redact import redact
    from hivlp.retrieval.milvus import MilvusDualIndex

    export_dir = gather_shards([shard.path for shard in embeddings], tempfile.mkdtemp(prefix="hivlp-export-"))
    with MilvusDualIndex(milvus_uri, name) as index:
        result = index.build(export_dir, coarse_dim=coarse_dim, index=index_type, progress=False)
    atomic_write_json(summary.path, result)
    summary.metadata.update({"uri": redact(milvus_uri), "name": name, "coarse_dim": coarse_dim})
    for kind, rows in result["counts"].items():
        metrics.log_metric(f"{kind}_rows", rows)
    metrics.log_metric("upserted", result["upserted"])
    metrics.log_metric("seconds", result["seconds"])
