"""Image loading and the pixel transforms shared by training, caching and encoding."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError

from hivlp.errors import DatasetError


class ImageTooLargeError(DatasetError):
    """An image whose pixels would take too much memory to decode (a decompression bomb)."""


# Light augmentation for tower fine-tuning: keep most of the scene so the captions still describe it.
TRAIN_CROP_SCALE = (0.5, 1.0)


def load_image(path: str | Path, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image as RGB; a missing or corrupt file raises DatasetError naming it.

    `draft` (width, height) lets a JPEG decode at the smallest 1/2, 1/4 or 1/8 scale still at least
    that large (Pillow's draft mode): several times faster when only a thumbnail is wanted.
    """
    try:
        with Image.open(path) as img:
            if draft is not None:
                img.draft("RGB", draft)
            return img.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(
            f"{path}: image file not found (check data.image_root or the dataset JSON's filepath)"
        ) from None
    except DecompressionBombError as e:  # Pillow's guard against images that decode to gigapixels
        raise ImageTooLargeError(
            f"{path}: refused, the image is too large to decode safely ({e}); replace it with a smaller image"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(
            f"{path}: cannot decode image ({e}); replace or remove the file and re-run `hivlp validate`"
        ) from None


def decode_image_bytes(data: bytes, what: str, max_pixels: int) -> Image.Image:
    """Decode untrusted image bytes (an upload) as RGB, refusing what is not an image or would decode to
    more than `max_pixels` pixels.

    The size is read from the header before any pixel is decoded, so a small file that decodes to
    gigapixels costs nothing; Pillow's own bomb guard stays on as a second line. Raises
    ImageTooLargeError or DatasetError naming `what`.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{what}: refused, the image is {width}x{height} = {width * height:,} pixels, over the "
                    f"limit of {max_pixels:,} (a decompression bomb or a very large photo); send a smaller image"
                )
            return img.convert("RGB")
    except DecompressionBombError as e:
        raise ImageTooLargeError(
            f"{what}: refused, the image is too large to decode safely ({e}); send a smaller image"
        ) from None
    except UnidentifiedImageError:
        raise DatasetError(
            f"{what}: not an image (no image format recognised in its {len(data):,} bytes); send a JPEG, PNG or WebP file"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(
            f"{what}: not a readable image ({type(e).__name__}: {e}); send a JPEG, PNG or WebP file"
        ) from None


def files_fingerprint(paths: Sequence[str | Path], with_paths: bool = True) -> str:
    """A key for the content of image files without reading them: sha256 over each path, size and
    mtime_ns, in order (`with_paths=False`: size and mtime only, for data that may move). Replacing a
    file in place (same name, new pixels) changes it, so caches and exports keyed by it are recomputed
    rather than silently reused. A missing file raises DatasetError."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise DatasetError(
                f"{p}: image file not found (check data.image_root or the dataset JSON's filepath)"
            ) from None
        except OSError as e:
            raise DatasetError(f"{p}: cannot read the image file ({e.strerror})") from None
        name = p if with_paths else ""
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def image_transform(data_config: dict[str, Any], train: bool) -> Callable[[Image.Image], Any]:
    """PIL -> normalised tensor, following a timm data config (size, interpolation, mean/std, crop).

    Eval: resize + centre crop (deterministic, so cached trunk features stay valid).
    Train: random resized crop (scale 0.5-1) + horizontal flip, no colour jitter.
    """
    from timm.data import create_transform

    if not train:
        return create_transform(**data_config, is_training=False)
    return create_transform(
        **data_config,
        is_training=True,
        scale=TRAIN_CROP_SCALE,
        hflip=0.5,
        color_jitter=None,
        auto_augment=None,
    )
