"""The Karpathy-format reader on real Flickr8k entries: paths, splits, caption -> image index, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from hivlp.data.karpathy import PAIR_COLUMNS, load_split, read_json, read_pairs
from hivlp.errors import DatasetError

from .conftest import FLICKR8K


def _write(path: Path, images: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": "t", "images": images}))
    return path


@pytest.fixture(scope="module")
def entries(flickr8k_raw) -> list[dict]:
    """8 train then 4 val entries, interleaved as train, train, val, ... to exercise ordering."""
    train = [img for img in flickr8k_raw["images"] if img["split"] == "train"][:8]
    val = [img for img in flickr8k_raw["images"] if img["split"] == "val"][:4]
    mixed = []
    for i in range(4):
        mixed += [train[2 * i], train[2 * i + 1], val[i]]
    return copy.deepcopy(mixed)


def test_pairs_table_from_the_shipped_json(flickr8k_json, flickr8k_raw):
    pairs = read_pairs(flickr8k_json)
    assert list(pairs.columns) == PAIR_COLUMNS
    assert len(pairs) == sum(len(img["sentences"]) for img in flickr8k_raw["images"])
    first = flickr8k_raw["images"][0]
    row = pairs.iloc[0]
    assert row["filename"] == first["filename"] and row["imgid"] == first["imgid"]
    assert row["caption"] == first["sentences"][0]["raw"]
    # image_root defaults to the JSON's folder: <json dir>/<filepath>/<filename>
    assert Path(row["path"]) == FLICKR8K.resolve() / first["filepath"] / first["filename"]
    assert Path(row["path"]).is_file()


def test_paths_follow_image_root_filepath_filename(tmp_path, entries):
    images = copy.deepcopy(entries[:3])
    images[0]["filepath"] = "pics"
    images[1]["filepath"] = "a/b"
    del images[2]["filepath"]  # optional: then the file sits directly under the root
    path = _write(tmp_path / "data" / "d.json", images)

    default = read_pairs(path).drop_duplicates("imgid")["path"].map(Path).tolist()
    root = (tmp_path / "data").resolve()
    assert default == [root / "pics" / images[0]["filename"], root / "a/b" / images[1]["filename"],
                       root / images[2]["filename"]]

    other = tmp_path / "elsewhere"
    given = read_pairs(path, image_root=other).drop_duplicates("imgid")["path"].map(Path).tolist()
    assert given == [other / "pics" / images[0]["filename"], other / "a/b" / images[1]["filename"],
                     other / images[2]["filename"]]


def test_split_filter(tmp_path, entries):
    path = _write(tmp_path / "d.json", entries)
    val = read_pairs(path, split="val")
    assert set(val["split"]) == {"val"}
    assert list(val.index) == list(range(len(val)))
    expected = [s["sentid"] for img in entries if img["split"] == "val" for s in img["sentences"]]
    assert val["sentid"].tolist() == expected
    assert read_pairs(path, split="test").empty


def test_retrieval_split_maps_each_caption_to_its_image(tmp_path, entries):
    path = _write(tmp_path / "d.json", entries)
    split = load_split(path, "train")
    train = [img for img in entries if img["split"] == "train"]
    assert split.filenames == [img["filename"] for img in train]
    assert split.imgids == [img["imgid"] for img in train]
    assert split.n_images == len(train) and split.n_texts == sum(len(img["sentences"]) for img in train)
    owner = {s["sentid"]: img["filename"] for img in train for s in img["sentences"]}
    caption = {s["sentid"]: s["raw"] for img in train for s in img["sentences"]}
    for sentid, text, image_index in zip(split.sentids, split.captions, split.text_to_image):
        assert split.filenames[image_index] == owner[sentid]
        assert text == caption[sentid]
        assert Path(split.image_paths[image_index]).name == owner[sentid]


def test_limit_images_keeps_the_first_images_and_only_their_captions(tmp_path, entries):
    path = _write(tmp_path / "d.json", entries)
    split = load_split(path, "train", limit_images=3)
    train = [img for img in entries if img["split"] == "train"][:3]
    assert split.filenames == [img["filename"] for img in train]
    assert split.sentids == [s["sentid"] for img in train for s in img["sentences"]]
    assert split.text_to_image.max() == 2
    assert sorted(set(split.text_to_image.tolist())) == [0, 1, 2]


def test_empty_split_is_an_error(tmp_path, entries):
    path = _write(tmp_path / "d.json", entries)
    with pytest.raises(DatasetError, match="no captions in split 'test'"):
        load_split(path, "test")


@pytest.mark.parametrize(
    "text, pattern",
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "wrong schema"),
        (json.dumps({"images": {"a": 1}}), "wrong schema"),
    ],
)
def test_unreadable_files(tmp_path, text, pattern):
    path = tmp_path / "d.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DatasetError, match=pattern) as e:
        read_json(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "break_it, pattern",
    [
        (lambda imgs: imgs[1].pop("split"), r"images\[1\] .*missing field 'split'"),
        (lambda imgs: imgs[2].pop("sentences"), r"images\[2\] .*missing field 'sentences'"),
        (lambda imgs: imgs.__setitem__(0, "x.jpg"), r"images\[0\]: expected an object"),
        (lambda imgs: imgs[1].__setitem__("sentences", "a dog"), r"images\[1\] .*'sentences' must be a list"),
        (lambda imgs: imgs[2]["sentences"][3].pop("raw"), r"images\[2\] .*sentences\[3\]: missing field 'raw'"),
    ],
)
def test_bad_entries_name_the_entry_and_field(tmp_path, entries, break_it, pattern):
    images = copy.deepcopy(entries[:3])
    break_it(images)
    path = _write(tmp_path / "d.json", images)
    with pytest.raises(DatasetError, match=pattern):
        read_pairs(path)
