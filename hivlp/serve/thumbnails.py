"""Small JPEGs of the dataset images an index points to, for the search page and API.

Images are found by the one path rule of the dataset reader (`hivlp.data.karpathy.image_path`: image
root / filepath / filename) from the dataset JSON the export's manifest names, keyed by imgid. Only the
dataset's own entries are ever opened (a request names an index id, never a path), and each resolved
path, symlinks followed, must lie inside the image root: an entry such as `../../etc/passwd`, or a
symlink out of the folder, is refused. Thumbnails are made once and kept in an LRU cache.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

from hivlp.data.images import load_image
from hivlp.data.karpathy import image_path, image_root_for, read_json
from hivlp.errors import HivlpError

THUMB_SIZE = 256  # longest side, pixels
THUMB_QUALITY = 82
CACHE_ITEMS = 4096  # about 10 kB each


class ThumbnailError(HivlpError):
    """A thumbnail cannot be served; `status` is the HTTP status a server answers with."""

    status = 404


class ThumbnailNotFound(ThumbnailError):
    status = 404


class OutsideImageRoot(ThumbnailError):
    status = 403


class Thumbnails:
    """The images of one dataset JSON, as small JPEGs by imgid."""

    def __init__(
        self,
        dataset_json: str | Path,
        image_root: str | Path | None = None,
        size: int = THUMB_SIZE,
        cache_items: int = CACHE_ITEMS,
    ) -> None:
        self.dataset = Path(dataset_json)
        data = read_json(self.dataset)
        self.image_root = Path(image_root_for(self.dataset, image_root)).resolve()
        self.size = int(size)
        self._entries = {int(img["imgid"]): img for img in data["images"]}
        self._captions = {
            int(img["imgid"]): img["sentences"][0]["raw"] for img in data["images"] if img.get("sentences")
        }
        self.jpeg = functools.lru_cache(maxsize=cache_items)(self._make_jpeg)

    def __len__(self) -> int:
        return len(self._entries)

    def caption(self, imgid: int) -> str | None:
        """The first reference caption of an image in the dataset (what the page shows for an image hit)."""
        return self._captions.get(int(imgid))

    def path(self, imgid: int) -> Path:
        """The image file of `imgid`, resolved; refused unless it lies inside the image root."""
        entry = self._entries.get(int(imgid))
        if entry is None:
            raise ThumbnailNotFound(f"image {imgid} is not in the dataset {self.dataset.name}")
        p = image_path(self.image_root, entry).resolve()
        if not p.is_relative_to(self.image_root):
            raise OutsideImageRoot(
                f"image {imgid} resolves outside the image root {self.image_root}; refused "
                "(check the dataset entry's filepath/filename, or serve with --image-root)"
            )
        if not p.is_file():
            raise ThumbnailNotFound(f"image {imgid}: file {p.name} not found under the image root")
        return p

    def _make_jpeg(self, imgid: int) -> bytes:
        img = load_image(self.path(imgid), draft=(self.size, self.size))
        img.thumbnail((self.size, self.size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=THUMB_QUALITY, optimize=True)
        return buf.getvalue()
