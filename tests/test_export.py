"""Embedding export: Parquet shards + manifest from a real checkpoint over real Flickr8k val images."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hivlp.cli import main
from hivlp.config import ModelConfig, RunConfig
from hivlp.embeddings.export import export_embeddings
from hivlp.embeddings.format import (
    TEXT_ID_OFFSET,
    batch_embeddings,
    iter_shard_batches,
    load_embeddings,
    read_manifest,
    shard_range,
)
from hivlp.errors import UsageError
from hivlp.io import sha256_file
from tests.conftest import write_slice


@functools.cache
def real_model():
    """The real dual encoder (pretrained towers, untrained head), built once per test process."""
    from hivlp.model import create_model

    return create_model(ModelConfig()).eval()


@pytest.fixture(scope="module")
def model_and_checkpoint(tmp_path_factory):
    from hivlp.model import save_checkpoint

    model = real_model()
    return model, save_checkpoint(model, RunConfig(), tmp_path_factory.mktemp("ckpt") / "ckpt")


@pytest.fixture(scope="module")
def val8(tmp_path_factory, flickr8k_raw):
    return write_slice(flickr8k_raw, tmp_path_factory.mktemp("val8"), n_train=0, n_val=8)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, model_and_checkpoint, val8):
    """One-shard export of the 8 val images and their 40 captions."""
    out = tmp_path_factory.mktemp("export") / "whole"
    export_embeddings(model_and_checkpoint[1], val8, "val", out, device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, model_and_checkpoint, val8):
    """The same export in two shards, shard 1 first; yields the manifest seen between the two."""
    out = tmp_path_factory.mktemp("export") / "sharded"
    ckpt = model_and_checkpoint[1]
    first = export_embeddings(ckpt, val8, "val", out, shard=(1, 2), device="cpu", progress=False)
    partial = read_manifest(out)
    export_embeddings(ckpt, val8, "val", out, shard=(0, 2), device="cpu", progress=False)
    return out, first, partial


def test_export_schema_ids_and_manifest(whole, model_and_checkpoint, val8):
    model, ckpt = model_and_checkpoint
    m = read_manifest(whole)
    assert m["complete"] and m["num_shards"] == 1
    assert m["counts"] == {"image": 8, "text": 40} and m["rows"] == 48
    assert m["dim"] == model.embed_dim and m["levels"] == list(model.levels)
    assert m["weights_sha256"] == json.loads((ckpt / "meta.json").read_text())["weights_sha256"]
    shard = m["shards"][0]
    path = whole / shard["file"]
    assert sha256_file(path) == shard["sha256"]
    assert json.loads((whole / "manifest.json").read_text()) == m

    t = pq.read_table(path)
    assert t.column_names == ["id", "kind", "imgid", "sentid", "filename", "caption", "embedding"]
    assert t.schema.field("id").type == pa.int64()
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), model.embed_dim)
    rows = t.to_pydict()
    assert len(set(rows["id"])) == t.num_rows == shard["rows"]
    images = [i for i, k in enumerate(rows["kind"]) if k == "image"]
    texts = [i for i, k in enumerate(rows["kind"]) if k == "text"]
    assert all(rows["id"][i] == rows["imgid"][i] and rows["sentid"][i] is None for i in images)
    assert all(rows["id"][i] == TEXT_ID_OFFSET + rows["sentid"][i] and rows["caption"][i] for i in texts)
    # every caption belongs to an exported image, with that image's filename
    image_files = {rows["imgid"][i]: rows["filename"][i] for i in images}
    assert all(image_files[rows["imgid"][i]] == rows["filename"][i] for i in texts)

    # the stored vectors are the model's full, unnormalised output for those images and captions
    from hivlp.data.karpathy import load_split
    from hivlp.model.encode import encode_images, encode_texts

    split = load_split(val8, "val")
    emb = batch_embeddings(t)
    direct_img = encode_images(model, split.image_paths[:2], batch_size=2, num_workers=0, progress=False)
    direct_txt = encode_texts(model, split.captions[:3], progress=False, max_tokens=40)
    np.testing.assert_allclose(emb[:2], direct_img, atol=1e-4)
    np.testing.assert_allclose(emb[8:11], direct_txt, atol=1e-4)
    assert not np.allclose(np.linalg.norm(emb, axis=1), 1.0)


def test_shards_split_the_images_and_merge_on_read(sharded, whole):
    out, first, partial = sharded
    assert first.name == "shard-00001-of-00002.parquet"
    assert not partial["complete"] and partial["missing_shards"] == [0]
    m = read_manifest(out)
    assert m["complete"] and m["counts"] == read_manifest(whole)["counts"]

    per_shard = [pq.read_table(out / s["file"]).to_pydict() for s in m["shards"]]
    for rows in per_shard:  # captions travel with their image
        imgs = {i for i, k in zip(rows["imgid"], rows["kind"]) if k == "image"}
        assert {i for i, k in zip(rows["imgid"], rows["kind"]) if k == "text"} <= imgs
        assert len(imgs) == 4
    a, b = (load_embeddings(d).sort_by("id") for d in (whole, out))
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    np.testing.assert_allclose(batch_embeddings(a), batch_embeddings(b), atol=1e-4)


def test_rerun_of_a_finished_shard_is_a_noop(whole, model_and_checkpoint, val8, monkeypatch):
    path = whole / "shard-00000-of-00001.parquet"
    before = path.stat().st_mtime_ns

    def no_model(*a, **k):
        raise AssertionError("a finished shard must not load the model")

    monkeypatch.setattr("hivlp.model.encode.load_encoder", no_model)
    assert export_embeddings(model_and_checkpoint[1], val8, "val", whole, device="cpu") == path
    assert path.stat().st_mtime_ns == before


def test_corrupt_or_unlisted_shard_is_exported_again(tmp_path, sharded, model_and_checkpoint, val8):
    out = tmp_path / "exp"
    shutil.copytree(sharded[0], out)
    path = out / "shard-00000-of-00002.parquet"
    good = sha256_file(path)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="checksum differs from its manifest part; re-export shard 0"):
        list(iter_shard_batches(out))
    export_embeddings(model_and_checkpoint[1], val8, "val", out, shard=(0, 2), device="cpu", progress=False)
    assert sha256_file(path) == good == read_manifest(out)["shards"][0]["sha256"]
    assert not list(out.glob(".*.tmp"))
    # a crash between the Parquet rename and the manifest part: the shard counts as missing
    (out / "shard-00001-of-00002.json").unlink()
    m = read_manifest(out)
    assert m["missing_shards"] == [1] and not m["complete"]


def test_a_different_export_in_the_same_folder_is_refused(
    tmp_path, sharded, whole, model_and_checkpoint, flickr8k_raw
):
    other = write_slice(flickr8k_raw, tmp_path / "val6", n_train=0, n_val=6)
    ckpt = model_and_checkpoint[1]
    with pytest.raises(UsageError, match="different export \\(dataset_sha256, images_fingerprint differ\\)"):
        export_embeddings(ckpt, other, "val", sharded[0], shard=(0, 2), device="cpu", progress=False)
    with pytest.raises(UsageError, match="shard count"):
        export_embeddings(ckpt, other, "val", whole, shard=(0, 3), device="cpu", progress=False)


@pytest.mark.parametrize("n_items", [0, 1, 7, 1000])
@pytest.mark.parametrize("n_shards", [1, 3, 8])
def test_shard_ranges_tile_the_items(n_items, n_shards):
    ranges = [shard_range(n_items, (i, n_shards)) for i in range(n_shards)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n_items
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("spec", ["2/2", "-1/2", "1", "a/b"])
def test_cli_rejects_a_bad_shard(spec, tmp_path, val8, capsys):
    code = main(["export", "--dataset", str(val8), "--out", str(tmp_path / "x"), f"--shard={spec}"])
    assert code == 2
    assert f"--shard {spec!r}" in capsys.readouterr().err


def test_cli_reports_a_missing_checkpoint(tmp_path, val8, capsys):
    nope = str(tmp_path / "nope")
    code = main(["export", "--checkpoint", nope, "--dataset", str(val8), "--out", str(tmp_path / "x")])
    assert code == 2
    assert f"{nope}: checkpoint folder not found" in capsys.readouterr().err
