"""The dataset digest (the pipeline's cache key) and staging under it, on real Flickr8k files."""

from __future__ import annotations

import json
import shutil

import pytest

from hivlp.data.fingerprint import STAGED_MARKER, dataset_digest, stage_dataset
from hivlp.errors import DatasetError, UsageError

from .conftest import FLICKR8K


@pytest.fixture
def folder(tmp_path, flickr8k_raw):
    """A self-contained dataset folder: a Karpathy JSON and copies of 6 real images beside it."""
    out = tmp_path / "ds"
    (out / "images").mkdir(parents=True)
    entries = [dict(e, filepath="images") for e in flickr8k_raw["images"][:6]]
    for e in entries:
        shutil.copy(FLICKR8K / "images" / e["filename"], out / "images" / e["filename"])
    (out / "d.json").write_text(json.dumps({"dataset": "mini", "images": entries}))
    return out


def test_digest_follows_content_not_location(folder, tmp_path):
    d = dataset_digest(folder / "d.json")
    assert (d.images, d.missing) == (6, 0) and len(d.digest) == 64 and d.short == d.digest[:16]
    assert dataset_digest(folder / "d.json") == d  # deterministic

    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    assert dataset_digest(moved / "d.json").digest == d.digest  # same files elsewhere: same version

    # One image's bytes change (same name, same size): a new version.
    img = next((moved / "images").iterdir())
    data = bytearray(img.read_bytes())
    data[-10] ^= 0xFF
    img.write_bytes(bytes(data))
    assert dataset_digest(moved / "d.json").digest != d.digest

    # A caption edited in the JSON: a new version.
    raw = json.loads((folder / "d.json").read_text())
    raw["images"][0]["sentences"][0]["raw"] += " again"
    (folder / "d.json").write_text(json.dumps(raw))
    assert dataset_digest(folder / "d.json").digest != d.digest


def test_missing_images_enter_the_digest_and_are_counted(folder):
    before = dataset_digest(folder / "d.json")
    next((folder / "images").iterdir()).unlink()
    after = dataset_digest(folder / "d.json")
    assert after.missing == 1 and after.digest != before.digest


def test_bad_input_is_one_line(tmp_path, folder):
    with pytest.raises(DatasetError, match="dataset file not found"):
        dataset_digest(tmp_path / "nope.json")
    with pytest.raises(UsageError, match="not a folder"):
        dataset_digest(folder / "d.json", image_root=tmp_path / "nope")


def test_stage_copies_under_the_digest_and_reuses_only_a_verified_copy(folder, tmp_path):
    root = tmp_path / "volume" / "staged"
    path, d = stage_dataset(folder, "d.json", root)
    assert path == root / d.short / "d.json" and path.read_bytes() == (folder / "d.json").read_bytes()
    assert json.loads((path.parent / STAGED_MARKER).read_text())["digest"] == d.digest
    assert dataset_digest(path).digest == d.digest

    # Same content again: the staged copy is reused (checked, not recopied).
    mtime = path.stat().st_mtime_ns
    assert stage_dataset(folder, "d.json", root) == (path, d) and path.stat().st_mtime_ns == mtime

    # A staged copy edited in place is not trusted: it is replaced by a fresh copy.
    img = next((path.parent / "images").iterdir())
    img.write_bytes(b"tampered")
    path2, d2 = stage_dataset(folder, "d.json", root)
    assert (path2, d2) == (path, d) and dataset_digest(path).digest == d.digest

    # New content: a new folder beside the old one; nothing half-written is left.
    raw = json.loads((folder / "d.json").read_text())
    raw["images"] = raw["images"][:3]
    (folder / "d.json").write_text(json.dumps(raw))
    path3, d3 = stage_dataset(folder, "d.json", root)
    assert d3.digest != d.digest and path3.parent != path.parent and path.is_file()
    assert sorted(p.name for p in root.iterdir()) == sorted([d.short, d3.short])


def test_stage_refuses_an_incomplete_import(folder, tmp_path):
    next((folder / "images").iterdir()).unlink()
    with pytest.raises(DatasetError, match="1 of 6 referenced images are not in the imported folder"):
        stage_dataset(folder, "d.json", tmp_path / "staged")
    with pytest.raises(DatasetError, match=r"not found in the imported folder \(JSON files there: \['d.json'\]\)"):
        stage_dataset(folder, "other.json", tmp_path / "staged")
    with pytest.raises(UsageError, match="inside the imported folder"):
        stage_dataset(folder, "../d.json", tmp_path / "staged")
    assert not (tmp_path / "staged").exists()
