"""Reader for the Karpathy retrieval JSON (Flickr8k, Flickr30k and COCO share it).

    {"dataset": "flickr8k", "images": [{"filepath": "images", "filename": "x.jpg", "imgid": 0,
      "split": "train", "sentids": [0, ...], "sentences": [{"raw": "...", "sentid": 0, ...}]}]}

An image's path is `<image_root>/<filepath>/<filename>`; `image_root` defaults to the JSON's folder.
The pairs table has one row per caption: imgid, sentid, filename, path, caption, split.

Everything the reader hands on has been checked here, once:
- schema (`read_json`): the fields and types the reader relies on, and id ranges: an image's id is its
  `imgid` and a caption's is `TEXT_ID_OFFSET + sentid` in exports and indexes (int64 primary keys), so
  0 <= imgid < 10^9 and 0 <= sentid <= MAX_SENTID keep the two id spaces apart and inside int64;
- paths (`image_paths`): every image stays inside the image root (no `..`, no absolute path and no
  symlink leading out) unless `allow_outside_root` is given; nothing outside is ever opened or stat'ed;
- consistency (`check_consistency`, on every read for training, evaluation and export): unique imgids,
  sentids and image files, no empty captions. `hivlp validate` reads without it and reports each of
  these as a great-expectations finding instead, so what validation flags, the other commands refuse.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hivlp.errors import DatasetError

PAIR_COLUMNS = ["imgid", "sentid", "filename", "path", "caption", "split"]

# The id scheme of exports and indexes: image id = imgid, caption id = TEXT_ID_OFFSET + sentid.
TEXT_ID_OFFSET = 10**9
MAX_IMGID = TEXT_ID_OFFSET - 1
MAX_SENTID = 2**63 - 1 - TEXT_ID_OFFSET  # the caption id must fit a signed 64-bit key


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
    except RecursionError:
        raise DatasetError(
            f"{p}: JSON nested too deeply to read; not a Karpathy-format dataset, re-export it or restore it from DVC"
        ) from None
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


def _in(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and low <= v <= high


def _path_part(v: Any) -> bool:
    return isinstance(v, str) and "\0" not in v


_IMAGE_FIELDS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("filename", lambda v: _path_part(v) and v != "", "a non-empty string"),
    ("imgid", _in(0, MAX_IMGID), f"an integer in 0..{MAX_IMGID} (caption ids start at {TEXT_ID_OFFSET})"),
    ("split", lambda v: isinstance(v, str), "a string"),
    ("sentences", lambda v: isinstance(v, list), "a list"),
]
_SENTENCE_FIELDS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("sentid", _in(0, MAX_SENTID), f"an integer in 0..{MAX_SENTID} ({TEXT_ID_OFFSET} + sentid is an int64 id)"),
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
        if "filepath" in img and not _path_part(img["filepath"]):
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


def image_paths(
    data: dict, image_root: str | Path, json_path: str | Path = "", allow_outside_root: bool = False
) -> list[str]:
    """Every entry's image path (`image_path`), in entry order.

    A path that leads outside the image root (through `..`, an absolute filepath or filename, or a
    symlink) raises DatasetError naming the entry, before any file is opened: a dataset file must not
    make hivlp read, or report on, files anywhere on the machine. `allow_outside_root` lifts the rule.
    """
    root = Path(image_root)
    paths = [image_path(root, img) for img in data["images"]]
    if not allow_outside_root:
        real_root = os.path.realpath(root)
        for i, (img, p) in enumerate(zip(data["images"], paths)):
            real = os.path.realpath(p)
            if os.path.commonpath([real_root, real]) != real_root:
                raise DatasetError(
                    f"{json_path}: images[{i}] ({img['filename']}): {p} leads outside the image root {root} "
                    f"(filepath {img.get('filepath', '')!r}); fix the entry's filepath/filename or give "
                    "--image-root; if the images really live there, pass --allow-outside-root "
                    "(data.allow_outside_root in a recipe)"
                )
    return [str(p) for p in paths]


def pairs_from_json(
    data: dict, image_root: str | Path, json_path: str | Path = "", allow_outside_root: bool = False
) -> pd.DataFrame:
    """Flatten a parsed JSON (schema already checked by `read_json`) into the pairs table; image paths
    are checked by `image_paths`."""
    paths = image_paths(data, image_root, json_path, allow_outside_root)
    rows = [
        (img["imgid"], s["sentid"], img["filename"], path, s["raw"], img["split"])
        for img, path in zip(data["images"], paths)
        for s in img["sentences"]
    ]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def _first_duplicate(keys: list[Any]) -> tuple[Any, list[int]] | None:
    seen: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        seen.setdefault(k, []).append(i)
    return next(((k, where) for k, where in seen.items() if len(where) > 1), None)


def check_consistency(data: dict, json_path: str | Path, paths: list[str] | None = None) -> None:
    """Refuse what `hivlp validate` reports as errors about ids, files and captions: duplicate imgids,
    sentids or image files (they silently change every recall and collide as index keys) and null or
    blank captions. DatasetError names the first offender and points at `hivlp validate`."""
    fix = f"`hivlp validate {json_path}` lists every problem"
    images = data["images"]
    dup = _first_duplicate([img["imgid"] for img in images])
    if dup:
        k, where = dup
        raise DatasetError(
            f"{json_path}: imgid {k} is used by {len(where)} entries "
            f"({', '.join(f'images[{i}]' for i in where[:5])}); give every image its own imgid ({fix})"
        )
    owners = [(i, s["sentid"]) for i, img in enumerate(images) for s in img["sentences"]]
    dup = _first_duplicate([sid for _, sid in owners])
    if dup:
        k, where = dup
        raise DatasetError(
            f"{json_path}: sentid {k} is used by {len(where)} captions "
            f"(of {', '.join(dict.fromkeys(f'images[{owners[j][0]}]' for j in where[:5]))}); "
            f"give every sentence its own sentid ({fix})"
        )
    if paths is not None:
        dup = _first_duplicate([os.path.normpath(p) for p in paths])
        if dup:
            k, where = dup
            raise DatasetError(
                f"{json_path}: image file {k} is listed by {len(where)} entries "
                f"({', '.join(f'images[{i}]' for i in where[:5])}); merge their captions into one entry ({fix})"
            )
    for i, img in enumerate(images):
        for j, s in enumerate(img["sentences"]):
            if s["raw"] is None or not s["raw"].strip():
                raise DatasetError(
                    f"{json_path}: images[{i}] ({img['filename']}) sentences[{j}] sentid {s['sentid']}: "
                    f"the caption is empty; write it in 'raw' or remove the sentence ({fix})"
                )


def image_root_for(json_path: str | Path, image_root: str | Path | None = None) -> Path:
    return Path(image_root) if image_root is not None else Path(json_path).resolve().parent


def read_pairs(
    json_path: str | Path,
    image_root: str | Path | None = None,
    split: str | None = None,
    allow_outside_root: bool = False,
) -> pd.DataFrame:
    """The pairs table of a Karpathy JSON, optionally one split; refuses an inconsistent dataset
    (`check_consistency`) and images outside the image root (`image_paths`)."""
    data = read_json(json_path)
    root = image_root_for(json_path, image_root)
    paths = image_paths(data, root, json_path, allow_outside_root)
    check_consistency(data, json_path, paths)
    pairs = pairs_from_json(data, root, json_path, allow_outside_root=True)  # checked just above
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
    allow_outside_root: bool = False,
) -> RetrievalSplit:
    pairs = read_pairs(json_path, image_root, split, allow_outside_root)
    if pairs.empty:
        raise DatasetError(f"{json_path}: no captions in split {split!r}")
    return retrieval_split(pairs, limit_images)
