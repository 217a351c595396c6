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
    """
    import os
    import tempfile
    from pathlib import Path

    from hivlp.io import atomic_write_json
    from hivlp.retrieval.milvus import MilvusDualIndex

    # Each shard task wrote its own folder; an export folder is the union of their files.
    export_dir = Path(tempfile.mkdtemp(prefix="hivlp-export-"))
    for shard in embeddings:
        for f in Path(shard.path).glob("shard-*-of-*.*"):
            os.symlink(f, export_dir / f.name)
    with MilvusDualIndex(milvus_uri, name) as index:
        result = index.build(export_dir, coarse_dim=coarse_dim, index=index_type, progress=False)
    atomic_write_json(summary.path, result)
    summary.metadata.update({"uri": milvus_uri, "name": name, "coarse_dim": coarse_dim})
    for kind, rows in result["counts"].items():
        metrics.log_metric(f"{kind}_rows", rows)
    metrics.log_metric("upserted", result["upserted"])
    metrics.log_metric("seconds", result["seconds"])
