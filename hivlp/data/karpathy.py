"""Reader for the Karpathy retrieval JSON (Flickr8k, Flickr30k and COCO share it).

    {"dataset": "flickr8k", "images": [{"filepath": "images", "filename": "x.jpg", "imgid": 0,
      "split": "train", "sentids": [0, ...], "sentences": [{"raw": "...", "sentid": 0, ...}]}]}

An image's path is `<image_root>/<filepath>/<filename>`; `image_root` defaults to the JSON's folder.
The pairs table has one row per caption: imgid, sentid, filename, path, caption, split.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hivlp.errors import DatasetError

PAIR_COLUMNS = ["imgid", "sentid", "filename", "path", "caption", "split"]


def read_json(json_path: str | Path) -> dict:
    """Load a Karpathy-format JSON and check its schema (`check_schema`), raising DatasetError (not a
    traceback) when it is unreadable or an entry lacks a field the reader relies on."""
    p = Path(json_path)
    if not p.is_file():
        raise DatasetError(f"{p}: dataset file not found; check the path to the Karpathy-format JSON")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise DatasetError(f"{p}: cannot read ({e.strerror}); check its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{p}: not valid JSON ({e}); re-export the file or restore it from DVC") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(
            f"{p}: wrong schema: expected an object with an 'images' list (Karpathy retrieval format)"
        )
    check_schema(data, p)
    return data


# ---------------------------------------------------------------------------------------------
# Schema: the fields and types the reader relies on


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_IMAGE_FIELDS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("filename", lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    ("imgid", _is_int, "an integer"),
    ("split", lambda v: isinstance(v, str), "a string"),
    ("sentences", lambda v: isinstance(v, list), "a list"),
]
_SENTENCE_FIELDS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("sentid", _is_int, "an integer"),
    # A null caption is a data problem (reported as empty_caption), not a broken structure.
    ("raw", lambda v: v is None or isinstance(v, str), "a string"),
]


def _field_error(where: str, key: str, value: Any, expected: str) -> DatasetError:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return DatasetError(
        f"{where}: field '{key}' must be {expected}, got {type(value).__name__} {shown}; "
        "fix the entry or re-export the dataset in the Karpathy format"
    )


def check_schema(data: dict, json_path: str | Path) -> None:
    """Raise DatasetError naming the file, entry index and field of the first malformed entry."""
    for i, img in enumerate(data["images"]):
        where = f"{json_path}: images[{i}]"
        if not isinstance(img, dict):
            raise DatasetError(f"{where}: expected an object, got {type(img).__name__}")
        if isinstance(img.get("filename"), str):
            where += f" ({img['filename']})"
        for key, valid, expected in _IMAGE_FIELDS:
            if key not in img:
                raise DatasetError(
                    f"{where}: missing field '{key}'; "
                    "every image needs filename, imgid, split and sentences"
                )
            if not valid(img[key]):
                raise _field_error(where, key, img[key], expected)
        if "filepath" in img and not isinstance(img["filepath"], str):
            raise _field_error(where, "filepath", img["filepath"], "a string")
        for j, sent in enumerate(img["sentences"]):
            swhere = f"{where} sentences[{j}]"
            if not isinstance(sent, dict):
                raise DatasetError(f"{swhere}: expected an object, got {type(sent).__name__}")
            for key, valid, expected in _SENTENCE_FIELDS:
                if key not in sent:
                    raise DatasetError(
                        f"{swhere}: missing field '{key}'; every sentence needs raw and sentid"
                    )
                if not valid(sent[key]):
                    raise _field_error(swhere, key, sent[key], expected)


# ---------------------------------------------------------------------------------------------
# Pairs


def image_path(image_root: str | Path, entry: dict) -> Path:
    """The one rule for where an image lives: <image_root>/<filepath>/<filename>."""
    return Path(image_root) / entry.get("filepath", "") / entry["filename"]


def pairs_from_json(data: dict, image_root: str | Path) -> pd.DataFrame:
    """Flatten a parsed JSON (schema already checked by `read_json`) into the pairs table."""
    root = Path(image_root)
    rows = [
        (img["imgid"], s["sentid"], img["filename"], str(image_path(root, img)), s["raw"], img["split"])
        for img in data["images"]
        for s in img["sentences"]
    ]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def image_root_for(json_path: str | Path, image_root: str | Path | None = None) -> Path:
    return Path(image_root) if image_root is not None else Path(json_path).resolve().parent


def read_pairs(
    json_path: str | Path, image_root: str | Path | None = None, split: str | None = None
) -> pd.DataFrame:
    """The pairs table of a Karpathy JSON, optionally one split."""
    data = read_json(json_path)
    pairs = pairs_from_json(data, image_root_for(json_path, image_root))
    if split is not None:
        pairs = pairs[pairs["split"] == split].reset_index(drop=True)
    return pairs


@dataclass
class RetrievalSplit:
    """The images and captions of one split, in a fixed order, with caption -> image index."""

    image_paths: list[str]
    filenames: list[str]
    imgids: list[int]
    captions: list[str]
    sentids: list[int]
    text_to_image: np.ndarray  # [n_texts] index into image_paths

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    @property
    def n_texts(self) -> int:
        return len(self.captions)


def retrieval_split(pairs: pd.DataFrame, limit_images: int | None = None) -> RetrievalSplit:
    """Group a pairs table (usually one split) into images + captions, keeping first-seen order."""
    images = pairs.drop_duplicates("imgid")[["imgid", "filename", "path"]].reset_index(drop=True)
    if limit_images is not None:
        images = images.iloc[:limit_images]
        pairs = pairs[pairs["imgid"].isin(set(images["imgid"]))]
    index = {imgid: i for i, imgid in enumerate(images["imgid"])}
    return RetrievalSplit(
        image_paths=images["path"].tolist(),
        filenames=images["filename"].tolist(),
        imgids=[int(x) for x in images["imgid"]],
        captions=pairs["caption"].tolist(),
        sentids=[int(x) for x in pairs["sentid"]],
        text_to_image=np.array([index[i] for i in pairs["imgid"]], dtype=np.int64),
    )


def load_split(
    json_path: str | Path,
    split: str,
    image_root: str | Path | None = None,
    limit_images: int | None = None,
) -> RetrievalSplit:
    pairs = read_pairs(json_path, image_root, split)
    if pairs.empty:
        raise DatasetError(f"{json_path}: no captions in split {split!r}")
    return retrieval_split(pairs, limit_images)
