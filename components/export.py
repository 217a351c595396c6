"""Sharded embedding export (`hivlp export --shard i/n`): the pipeline fans out one task per shard, then
shows a page of sample queries over the whole export."""

from typing import List

from kfp.dsl import HTML, Dataset, Input, Model, Output

from components.base import hivlp_component


@hivlp_component
def shard_indices(num_shards: int) -> List[int]:
    """[0, 1, ..., num_shards - 1]: the items of the export fan-out.

    Args:
        num_shards: Number of export shards.
    """
    from hivlp.embeddings.format import check_shard

    check_shard((0, num_shards))
    return list(range(num_shards))


@hivlp_component
def export_shard(
    dataset_json: str,
    data_digest: str,
    model: Input[Model],
    shard: int,
    num_shards: int,
    embeddings: Output[Dataset],
    split: str = "test",
    image_root: str = "",
):
    """Embed shard `shard` of `num_shards` of a split: a Parquet file plus its manifest part.

    Args:
        dataset_json: Karpathy-format JSON inside the container (on the data volume).
        data_digest: Content digest of the dataset (the cache key: changed data is exported again).
        model: The checkpoint that embeds (the champion just promoted).
        shard: Which shard, 0-based.
        num_shards: How many shards the split is cut into.
        split: The split exported.
        image_root: Image folder; empty means the JSON's own folder.

    Returns:
        embeddings: The shard's Parquet file and manifest part.
    """
    from hivlp.embeddings.export import export_embeddings
    from hivlp.embeddings.format import read_manifest

    export_embeddings(
        model.path, dataset_json, split, embeddings.path, image_root=image_root or None,
        shard=(shard, num_shards), progress=False,
    )
    manifest = read_manifest(embeddings.path)
    embeddings.metadata.update({"shard": shard, "num_shards": num_shards, "dim": manifest["dim"],
                                "data_digest": data_digest, **manifest["counts"]})


@hivlp_component
def sample_queries(
    embeddings: Input[List[Dataset]],
    dataset_json: str,
    data_digest: str,
    page: Output[HTML],
    image_root: str = "",
    n_queries: int = 6,
    k: int = 5,
):
    """A page of sample queries over the whole export: captions of the split, their top images as thumbnails.

    Args:
        embeddings: The shards of one export (all tasks of the fan-out).
        dataset_json: The dataset the export was made from (for the images' thumbnails).
        data_digest: Content digest of the dataset (the cache key).
        image_root: Image folder; empty means the JSON's own folder.
        n_queries: How many captions to search with.
        k: Hits shown per query.

    Returns:
        page: HTML page: each query, its top hits as embedded thumbnails, the described image framed.
    """
    import tempfile

    from hivlp.embeddings.format import gather_shards
    from hivlp.io import atomic_write_text
    from hivlp.retrieval.gallery import sample_queries_page

    export_dir = gather_shards([shard.path for shard in embeddings], tempfile.mkdtemp(prefix="hivlp-export-"))
    atomic_write_text(page.path, sample_queries_page(export_dir, dataset_json, image_root=image_root or None,
                                                     n_queries=n_queries, k=k))
