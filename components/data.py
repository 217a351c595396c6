"""The data version every cached task is keyed on, and staging of a dataset imported from a URI.

`fingerprint_dataset` and `stage_dataset` never come from the cache: they must look at today's files.
Their digest output is an input of every task that reads the dataset, so the KFP cache reruns those
tasks exactly when the content changed.
"""

from typing import NamedTuple

from kfp.dsl import Dataset, Input

from components.base import hivlp_component


@hivlp_component
def fingerprint_dataset(dataset_json: str, image_root: str = "") -> NamedTuple(
        "Fingerprint", [("digest", str), ("images", int)]):
    """Content digest of the dataset: the cache key of every task that reads it.

    Args:
        dataset_json: Karpathy-format JSON, a path inside the container (on the data volume).
        image_root: Image folder; empty means the JSON's own folder.

    Returns:
        digest: sha256 over the JSON's bytes and every referenced image's name, size and sha256.
        images: Number of distinct image files the JSON references.
    """
    from hivlp.data.fingerprint import dataset_digest

    d = dataset_digest(dataset_json, image_root=image_root or None)
    print(f"dataset {dataset_json}: digest {d.digest} ({d.images} images, {d.missing} missing, {d.bytes} bytes)")
    return (d.digest, d.images)


@hivlp_component
def stage_dataset(data: Input[Dataset], dataset_file: str, staging_root: str) -> NamedTuple(
        "Staged", [("dataset_json", str), ("digest", str)]):
    """Copy a dataset folder imported from a URI onto the data volume, under its content digest.

    Args:
        data: The folder imported from `data_uri` (the KFP launcher downloads it into the pod).
        dataset_file: Name of the Karpathy JSON inside that folder; image paths in it are relative to it.
        staging_root: Folder on the mounted data volume that receives the copy (`<root>/<digest>/`).

    Returns:
        dataset_json: Path of the staged JSON on the data volume: what the other tasks read.
        digest: Content digest of the dataset (as `fingerprint_dataset` computes it).
    """
    from hivlp.data.fingerprint import stage_dataset as stage
    from hivlp.redact import redact

    path, d = stage(data.path, dataset_file, staging_root)
    print(f"staged {d.images} images from {redact(data.uri)} at {path.parent} (digest {d.digest})")
    return (str(path), d.digest)
