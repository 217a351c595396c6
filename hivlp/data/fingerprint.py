"""The dataset's version: one content digest of a Karpathy JSON and every image file it references.

Why: anything keyed on its inputs (the Kubeflow cache above all) must see a changed dataset as a new
input, and a path says nothing about what is behind it. The digest changes when the JSON changes (a
caption edited, an image added, removed or moved to another split) or when the bytes of any referenced
image change; it does not change when the same files are copied elsewhere, because image names enter
it as the JSON writes them (`filepath/filename`), not as resolved absolute paths.

A referenced image that is missing enters the digest as missing: reporting it is the validator's job
(`hivlp.data.validate`), and the digest must not stop the run before that report is written.

`stage_dataset` copies an imported dataset folder onto shared storage under its digest, so a copy is
reused only when its content is the same, and checked before it is reused.
"""

from __future__ import annotations

import hashlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hivlp.data.karpathy import image_path, image_root_for, read_json
from hivlp.errors import DatasetError, UsageError
from hivlp.io import atomic_dir, atomic_write_json, sha256_file

FORMAT = "hivlp-dataset-digest/1"
STAGED_MARKER = ".hivlp-staged.json"


@dataclass(frozen=True)
class DatasetDigest:
    """What `dataset_digest` measured; `digest` is the version, `short` the form used in names."""

    digest: str  # sha256 (hex) over the JSON's bytes and every referenced image's name, size and sha256
    json_sha256: str
    images: int  # distinct image files referenced
    missing: int  # of those, how many were not found
    bytes: int  # JSON plus image bytes hashed

    @property
    def short(self) -> str:
        return self.digest[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self), "short": self.short}


def _image_names(data: dict) -> list[str]:
    """Every distinct image the JSON references, as the JSON writes it (`filepath/filename`)."""
    return sorted({(Path(e.get("filepath", "")) / e["filename"]).as_posix() for e in data["images"]})


def _hash_image(path: Path) -> tuple[int, str]:
    """(size, sha256) of a file; (-1, "") when it does not exist."""
    if not path.is_file():
        return -1, ""
    return path.stat().st_size, sha256_file(path)


def dataset_digest(
    json_path: str | Path,
    image_root: str | Path | None = None,
    workers: int = 8,
    progress: bool = False,
) -> DatasetDigest:
    """The content digest of a Karpathy-format dataset (see the module docstring for what it covers).

    Raises DatasetError when the JSON is unreadable or malformed (naming the file and the entry).
    """
    json_path = Path(json_path)
    if image_root is not None and not Path(image_root).is_dir():
        raise UsageError(f"image root {image_root}: not a folder; give the folder that holds the dataset's images")
    data = read_json(json_path)
    root = image_root_for(json_path, image_root)
    names = _image_names(data)
    # The same rule as every reader (`image_path`): <root>/<filepath>/<filename>.
    entry_of = {(Path(e.get("filepath", "")) / e["filename"]).as_posix(): e for e in data["images"]}
    paths = [image_path(root, entry_of[n]) for n in names]

    h = hashlib.sha256()
    json_sha = sha256_file(json_path)
    h.update(f"{FORMAT}\njson {json_sha}\n".encode())
    total = json_path.stat().st_size
    missing = 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(_hash_image, paths)
        for name, (size, sha) in tqdm(zip(names, results), total=len(names), desc="dataset digest",
                                      unit="img", disable=not progress):
            h.update(f"{name}\0{size}\0{sha}\n".encode())
            if size < 0:
                missing += 1
            else:
                total += size
    return DatasetDigest(digest=h.hexdigest(), json_sha256=json_sha, images=len(names), missing=missing, bytes=total)


def stage_dataset(
    source_dir: str | Path,
    dataset_file: str,
    staging_root: str | Path,
    progress: bool = False,
) -> tuple[Path, DatasetDigest]:
    """Copy a dataset folder (a Karpathy JSON `dataset_file` and the images it references, paths
    relative to the folder) to `<staging_root>/<digest>/`; return the JSON's new path and the digest.

    A folder already staged under the same digest is reused only after its own digest is checked
    again (a copy edited in place is replaced, not trusted). The copy is atomic: a crash leaves the
    previous copy or none, never half a dataset.
    """
    src = Path(source_dir)
    if not src.is_dir():
        raise UsageError(f"{src}: the imported dataset is not a folder; point data_uri at the folder that "
                         f"holds {dataset_file} and its images")
    if Path(dataset_file).is_absolute() or ".." in Path(dataset_file).parts:
        raise UsageError(f"dataset file {dataset_file!r} must be a path inside the imported folder")
    src_json = src / dataset_file
    if not src_json.is_file():
        present = sorted(p.name for p in src.glob("*.json"))[:5]
        raise DatasetError(f"{src_json}: not found in the imported folder (JSON files there: {present or 'none'}); "
                           "set dataset_file to the Karpathy JSON's name")
    digest = dataset_digest(src_json, progress=progress)
    if digest.missing:
        raise DatasetError(
            f"{src_json}: {digest.missing} of {digest.images} referenced images are not in the imported folder; "
            "upload them, or fix filepath/filename in the JSON"
        )
    dst = Path(staging_root) / digest.short
    staged_json = dst / dataset_file
    if (dst / STAGED_MARKER).is_file() and staged_json.is_file():
        if dataset_digest(staged_json).digest == digest.digest:
            return staged_json, digest
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(STAGED_MARKER))
        atomic_write_json(tmp / STAGED_MARKER, {**digest.to_dict(), "source": str(src), "dataset_file": dataset_file})
    return staged_json, digest
