"""Shared fixtures: real Flickr8k images from ../shared/data/flickr8k, cut into small slices."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLICKR8K = Path(os.environ.get("HIVLP_FLICKR8K", REPO.parent / "shared" / "data" / "flickr8k"))
FLICKR8K_JSON = FLICKR8K / "dataset_flickr8k.json"


def _require_data() -> None:
    if not FLICKR8K_JSON.is_file():
        pytest.fail(f"Flickr8k not found at {FLICKR8K} (set HIVLP_FLICKR8K)")


@pytest.fixture(scope="session")
def flickr8k_json() -> Path:
    _require_data()
    return FLICKR8K_JSON


@pytest.fixture(scope="session")
def flickr8k_raw() -> dict:
    _require_data()
    return json.loads(FLICKR8K_JSON.read_text())


def write_slice(raw: dict, out_dir: Path, n_train: int, n_val: int) -> Path:
    """A Karpathy JSON with the first n_train train and n_val val images of Flickr8k.

    The real images are copied into `out_dir/images` (the JSON's `filepath` stays relative): images
    must lie inside the image root, and a test may replace one without touching the shared data.
    """
    by_split: dict[str, list] = {"train": [], "val": []}
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for img in raw["images"]:
        s = img["split"]
        limit = {"train": n_train, "val": n_val}.get(s, 0)
        if s in by_split and len(by_split[s]) < limit:
            entry = dict(img)
            entry["filepath"] = "images"
            shutil.copyfile(FLICKR8K / img.get("filepath", "") / img["filename"], images / img["filename"])
            by_split[s].append(entry)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "dataset_slice.json"
    path.write_text(json.dumps({"dataset": "flickr8k-slice", "images": by_split["train"] + by_split["val"]}))
    return path


@pytest.fixture(scope="session")
def slice_json(tmp_path_factory, flickr8k_raw) -> Path:
    """64 train + 32 val real images (5 captions each), absolute image paths."""
    return write_slice(flickr8k_raw, tmp_path_factory.mktemp("slice"), n_train=64, n_val=32)


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real Milvus 2.3 standalone server (PyPI `milvus`) on free loopback ports, one per test session.

    Its URI is yielded; local vector stores of server indexes go under its folder ($HIVLP_VECTOR_STORE).
    A server that cannot start fails the test with the tail of its log: never a skip.
    """
    from hivlp.retrieval.milvus_server import MilvusServerError, local_server

    base = tmp_path_factory.mktemp("milvus-server")
    server = local_server(base)
    try:
        uri = server.__enter__()
    except MilvusServerError as e:
        pytest.fail(f"the Milvus server fixture could not start a server: {e}")
    old = os.environ.get("HIVLP_VECTOR_STORE")
    os.environ["HIVLP_VECTOR_STORE"] = str(base / "vectors")
    try:
        yield uri
    finally:
        if old is None:
            os.environ.pop("HIVLP_VECTOR_STORE", None)
        else:
            os.environ["HIVLP_VECTOR_STORE"] = old
        server.__exit__(None, None, None)
