"""Sharded embedding export (`hivlp export --shard i/n`): the pipeline fans out one task per shard."""

from typing import List

from kfp.dsl import Dataset, Input, Model, Output

from components.base import hivlp_component


@hivlp_component
def shard_indices(num_shards: int) -> List[int]:
    """[0, 1, ..., num_shards - 1]: the items of the export fan-out."""
    from hivlp.embeddings.format import check_shard

    check_shard((0, num_shards))
    return list(range(num_shards))


@hivlp_component
def export_shard(
    dataset_json: str,
    model: Input[Model],
    shard: int,
    num_shards: int,
    embeddings: Output[Dataset],
    split: str = "val",
    image_root: str = "",
):
    """Embed shard `shard` of `num_shards` of a split: a Parquet file plus its manifest part."""
    from hivlp.embeddings.export import export_embeddings
    from hivlp.embeddings.format import read_manifest

    export_embeddings(
        model.path, dataset_json, split, embeddings.path, image_root=image_root or None,
        shard=(shard, num_shards), progress=False,
    )
    manifest = read_manifest(embeddings.path)
    embeddings.metadata.update({"shard": shard, "num_shards": num_shards, "dim": manifest["dim"], **manifest["counts"]})
