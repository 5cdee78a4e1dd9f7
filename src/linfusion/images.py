"""Reading the images users give: one opener for every command, and PNG text read without the pixels.

:func:`open_image` is how ``linfusion upscale``, ``linfusion distill`` and the Python API read an image:
8-bit RGB whatever the file holds (16-bit greyscale scaled to 8 bits, not clipped to white), its size
checked against the caller's limit before any pixel is decoded, and every failure a :class:`ImageError`
that names the file. :func:`read_png_text` reads a PNG's text chunk (the ``parameters`` a run records)
from the header alone, so a 16K PNG is replayed without decoding it.

PIL refuses images above ``Image.MAX_IMAGE_PIXELS`` (about 179 million pixels) as possible decompression
bombs; the images this tool writes go up to 16384 x 16384, so the callers pass their own limit (the
planner's reach) and that check is lifted, under a lock, only while the header is read.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit greyscale (PNG and TIFF open as these)
_PIXEL_LIMIT_LOCK = threading.Lock()


class ImageError(UserError, ValueError):
    """An image cannot be read as given (missing, not an image, too large, a pixel format we cannot use)."""


@contextmanager
def _header(path: str | os.PathLike, max_pixels: int | None) -> Iterator[Image.Image]:
    """The image opened lazily (header only), refused when larger than ``max_pixels`` (None: any size)."""
    name = Path(path)
    try:
        with _PIXEL_LIMIT_LOCK:
            default_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # our own limit is checked below, before any pixel is decoded
            try:
                image = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = default_limit
    except FileNotFoundError as error:
        raise ImageError(f"{name}: no such file") from error
    except IsADirectoryError as error:
        raise ImageError(f"{name} is a folder, not an image") from error
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise ImageError(f"cannot read {name} as an image ({error})") from error
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError(
                f"{name} is {width}x{height} pixels, more than the {max_pixels:,} this tool can work with; "
                "pass a smaller image"
            )
        yield image


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: greyscale of more than 8 bits scaled by its range, palettes and alpha dropped
    as PIL does.

    PIL's own ``convert("RGB")`` clips such values at 255, which turns almost every 16-bit image white.
    16-bit modes (``I;16*``) scale 65535 -> 255; ``I`` (32-bit integers) scales so when its values exceed
    255 (16-bit data) and keeps 8-bit data; ``F`` (floats) in [0, 1] scales 1 -> 255 and keeps larger
    ranges, clipped to 0..255.
    """
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        largest = values.max(initial=0)
        if image.mode == "F":
            values = values * 255.0 if largest <= 1.0 else values
        elif image.mode != "I" or largest > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")  # a loaded copy even when RGB already: callers close the file after


def open_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, loaded (the file is closed); :class:`ImageError` when it cannot be.

    ``max_pixels``: the largest width x height accepted, checked before decoding (None: PIL's own limit).
    """
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    with _header(path, limit) as image:
        try:
            image.load()
            return to_rgb(image)
        except ImageError as error:
            raise ImageError(f"{Path(path)}: {error}") from error
        except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data
            raise ImageError(f"cannot read {Path(path)} as an image ({error})") from error


def read_png_text(path: str | os.PathLike, key: str = "parameters") -> str | None:
    """The text chunk ``key`` of the image at ``path`` (before its pixels, where PNG writers put it), or None.

    Reads the header only: any size is fine, nothing is decoded.
    """
    with _header(path, max_pixels=None) as image:
        value = image.info.get(key)
    return value if isinstance(value, str) else None


__all__ = ["SIXTEEN_BIT_MODES", "ImageError", "open_image", "read_png_text", "to_rgb"]
