"""Reader for the Karpathy retrieval JSON (Flickr8k, Flickr30k and COCO share it).

    {"dataset": "flickr8k", "images": [{"filepath": "images", "filename": "x.jpg", "imgid": 0,
      "split": "train", "sentids": [0, ...], "sentences": [{"raw": "...", "sentid": 0, ...}]}]}

An image's path is `<image_root>/<filepath>/<filename>`; `image_root` defaults to the JSON's folder.
The pairs table has one row per caption: imgid, sentid, filename, path, caption, split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hivlp.errors import DatasetError

PAIR_COLUMNS = ["imgid", "sentid", "filename", "path", "caption", "split"]


def read_json(json_path: str | Path) -> dict:
    """Load the raw JSON, raising DatasetError (not a traceback) when unreadable or wrong-shaped."""
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
    return data


def image_path(image_root: str | Path, entry: dict) -> Path:
    """The one rule for where an image lives: <image_root>/<filepath>/<filename>."""
    return Path(image_root) / entry.get("filepath", "") / entry["filename"]


def pairs_from_json(data: dict, image_root: str | Path) -> pd.DataFrame:
    """Flatten the parsed JSON into the pairs table. Raises DatasetError naming a malformed entry."""
    root = Path(image_root)
    rows = []
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise DatasetError(f"images[{i}]: expected an object, got {type(img).__name__}")
        for key in ("filename", "imgid", "split", "sentences"):
            if key not in img:
                raise DatasetError(
                    f"images[{i}] ({img.get('filename', '?')}): missing field '{key}'; "
                    "every image needs filename, imgid, split and sentences"
                )
        path = image_path(root, img)
        sents = img["sentences"]
        if not isinstance(sents, list):
            raise DatasetError(f"images[{i}] ({img['filename']}): 'sentences' must be a list")
        for j, s in enumerate(sents):
            if not isinstance(s, dict) or "raw" not in s or "sentid" not in s:
                raise DatasetError(
                    f"images[{i}] ({img['filename']}) sentences[{j}]: needs 'raw' and 'sentid'"
                )
            rows.append((img["imgid"], s["sentid"], img["filename"], str(path), s["raw"], img["split"]))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def image_root_for(json_path: str | Path, image_root: str | Path | None = None) -> Path:
    return Path(image_root) if image_root is not None else Path(json_path).resolve().parent


def read_pairs(
    json_path: str | Path, image_root: str | Path | None = None, split: str | None = None
) -> pd.DataFrame:
    """The pairs table of a Karpathy JSON, optionally one split."""
    from hivlp.data.validate import check_schema  # validate imports this module: import here

    data = read_json(json_path)
    check_schema(data, json_path)
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
