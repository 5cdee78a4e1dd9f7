"""The web UI's files: the outputs folder (new PNGs, never overwriting), uploads, and PNGs dropped on the page.

Every file the page hands in is checked here and refused with a :class:`~linfusion.errors.UserError` that
names the file (never the server's path to it).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..app.execute import save_png
from ..app.params import GenerationError, GenerationParams
from ..choices import GENERATION_MODES, VAE_ATTENTION_MODES
from ..errors import UserError, excerpt
from ..images import to_rgb

MAX_UPLOAD_PIXELS = 64 * 2**20  # an upload to enlarge: up to 64 megapixels
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass
class Result:
    path: Path
    parameters: str
    seed: int
    width: int
    height: int
    seconds: float


class OutputFolder:
    """The folder the images go to, and the images written to it since the server started."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).resolve()
        self._written: list[Result] = []

    def save(
        self,
        image: Image.Image,
        params: GenerationParams,
        started: float,
        extra: dict[str, str] | None = None,
    ) -> Result:
        """Write ``image`` as a new ``NNNNN-<seed>.png`` with its parameters (nothing left on failure).

        ``extra``: more ``Key: value`` pairs for the parameters text (an upscale's source and scale), which
        readers of the text that do not know them pass over.
        """
        path = reserve_output(self.folder, str(params.seed))
        try:
            save_png(image, params, path, extra)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        result = Result(
            path, params.to_text(extra), params.seed, image.width, image.height, time.monotonic() - started
        )
        self._written.append(result)
        return result

    def recent(self, limit: int = 48) -> list[Result]:
        """Images written since this server started, newest first."""
        return list(reversed(self._written[-limit:]))


def read_parameters(path: str | os.PathLike, model_names: Sequence[str]) -> tuple[dict[str, Any], str]:
    """The page's field values recorded in a PNG, and a note for the page (what was restored)."""
    name = Path(path).name
    image = open_page_file(path, name)
    try:
        text = image.info.get("parameters")
        if image.format != "PNG":
            raise UserError(
                f"{name} is a {image.format} file; drop a PNG written by linfusion or an SD web UI"
            )
    finally:
        image.close()
    if not text:
        raise UserError(
            f"{name} has no 'parameters' text chunk: it was not written by linfusion or an SD web UI "
            "(or the chunk was stripped)"
        )
    try:
        params = GenerationParams.from_text(text)
    except (GenerationError, ValueError, TypeError) as error:
        raise UserError(f"{name}: cannot read its parameters: {excerpt(str(error), 300)}") from error
    fields: dict[str, Any] = {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "width": params.width,
        "height": params.height,
        "steps": params.steps,
        "guidance": params.guidance,
        "seed": params.seed,
        "mode": params.mode if params.mode in GENERATION_MODES else "plain",
        "linfusion": params.linfusion != "none",
        "vae_attention": params.vae_attention if params.vae_attention in VAE_ATTENTION_MODES else "exact",
        "sampler": params.scheduler or "",
    }
    note = f"Restored the parameters of {name}."
    if params.model in model_names:
        fields["model"] = params.model
    elif params.model:
        note += f" It was made with model {params.model}, which this server was not started with."
    return fields, note


def reserve_output(folder: Path, stem: str) -> Path:
    """A new empty file ``NNNNN-<stem>.png`` (the next free number) in ``folder``, for a PNG to replace.

    The name is taken with an exclusive create, so two jobs never get the same one and nothing is ever
    overwritten; the PNG is then written over it atomically (:func:`linfusion.app.run.save_png`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    taken = [int(match.group(1)) for p in folder.iterdir() if (match := re.match(r"(\d{5,})-", p.name))]
    for number in itertools.count(max(taken, default=0) + 1):
        candidate = folder / f"{number:05d}-{stem}.png"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise AssertionError("unreachable")


def open_page_file(path: str | os.PathLike | None, name: str) -> Image.Image:
    """A file the page handed in, opened lazily: its integrity verified, nothing decoded, its format and
    text chunks kept; :class:`UserError` naming it as ``name`` only.

    Not :func:`linfusion.images.open_image`, which returns a decoded RGB copy (format and chunks gone) and
    names the file by its path: the callers here refuse by format, size and chunks before any decoding, and
    the page is never told where the server keeps its uploads.
    """
    if not path:
        raise UserError("no file was uploaded")
    try:
        with Image.open(path) as probe:
            probe.verify()  # a truncated or corrupt file fails here, before any decoding work
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise UserError(f"{name} has too many pixels to open safely") from error
    except UnidentifiedImageError as error:
        raise UserError(f"{name} is not a readable image (PNG, JPEG or WebP expected)") from error
    except (OSError, SyntaxError, ValueError) as error:
        reason = str(error).replace(str(path), name)  # the page is not told where the server keeps uploads
        raise UserError(f"{name} is not a readable image (damaged or cut short: {reason})") from error
    return image


def open_upload(path: str | os.PathLike | None) -> Image.Image:
    """An uploaded image to enlarge, as RGB; :class:`UserError` saying what is wrong otherwise."""
    name = Path(path).name if path else "the upload"
    image = open_page_file(path, name)
    with image:
        if image.format not in UPLOAD_FORMATS:
            raise UserError(f"{name} is a {image.format} image; upload a PNG, JPEG or WebP")
        if image.width * image.height > MAX_UPLOAD_PIXELS:
            raise UserError(
                f"{name} is {image.width}x{image.height}; this page enlarges images of up to "
                f"{MAX_UPLOAD_PIXELS:,} pixels"
            )
        if min(image.size) < 8:
            raise UserError(f"{name} is {image.width}x{image.height}; it needs at least 8 pixels per side")
        try:
            return to_rgb(image)  # 16-bit greyscale scaled to 8 bits, as every command reads images
        except OSError as error:
            raise UserError(f"{name} could not be decoded: {error}") from error


@contextlib.contextmanager
def upload_header(path: str | os.PathLike | None) -> Iterator[Image.Image | None]:
    """An upload opened for its size only (no pixels decoded), or None when it cannot be read."""
    if not path:
        yield None
        return
    try:
        image = Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError):
        yield None
        return
    with image:
        yield image if image.format in UPLOAD_FORMATS else None


__all__ = [
    "MAX_UPLOAD_PIXELS",
    "UPLOAD_FORMATS",
    "OutputFolder",
    "Result",
    "open_page_file",
    "open_upload",
    "read_parameters",
    "reserve_output",
    "upload_header",
]
