"""Image + caption data for distillation: folders, ``datasets`` datasets, crops, and a latent cache.

Images are resized so the short side equals the training resolution and then cropped (randomly or at
the centre), never warped to a square as the reference did. The crop is recorded for SD-XL's
micro-conditioning (original size, crop top-left, target size). Random crops are a pure function of
(seed, epoch, index), so an interrupted run resumes with exactly the same crops.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..hub import load_failure_message
from ..images import to_rgb

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(UserError, ValueError):
    """The training data cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Record:
    """Where one training image lives and its caption."""

    image: Any  # a path, or an item a datasets dataset returns
    caption: str


class ImageCaptionSource(Sequence):
    """Records of an image folder: captions from ``metadata.jsonl`` (Hugging Face imagefolder layout,
    ``file_name`` + caption column) or from same-stem ``.txt`` files."""

    def __init__(
        self, root: str | os.PathLike, caption_column: str = "text", allow_missing_captions: bool = False
    ):
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(f"data folder {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise DataError(f"--data {str(self.root)!r} is not a folder (nor a datasets dataset folder)")
        metadata = self.root / "metadata.jsonl"
        if metadata.exists():
            self.records = self._from_metadata(metadata, caption_column)
        else:
            self.records = self._from_text_files(allow_missing_captions)
        if not self.records:
            raise DataError(
                f"no images found in {str(self.root)!r} (looked for {', '.join(IMAGE_EXTENSIONS)} files, "
                "each with a same-stem .txt caption, or a metadata.jsonl)"
            )

    def _from_metadata(self, metadata: Path, caption_column: str) -> list[Record]:
        records = []
        for line_number, line in enumerate(read_caption_text(metadata).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                records.append(Record(self.root / str(entry["file_name"]), str(entry[caption_column])))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise DataError(
                    f"{metadata}:{line_number}: each line needs 'file_name' and '{caption_column}' ({error})"
                ) from error
        return records

    def _from_text_files(self, allow_missing_captions: bool) -> list[Record]:
        images = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        records, missing = [], []
        for path in images:
            caption_file = path.with_suffix(".txt")
            if caption_file.exists():
                records.append(Record(path, read_caption_text(caption_file).strip()))
            else:
                missing.append(path)
                records.append(Record(path, ""))
        if missing and not allow_missing_captions:
            examples = ", ".join(str(p.relative_to(self.root)) for p in missing[:3])
            raise DataError(
                f"{len(missing)} of {len(images)} images in {str(self.root)!r} have no caption (e.g. {examples}): "
                "add same-stem .txt files or a metadata.jsonl, or pass --allow-missing-captions to train "
                "them with empty captions"
            )
        if missing:
            logger.warning("%d images have no caption and are trained with an empty caption", len(missing))
        return records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        return self.records[index]


class HFDatasetSource(Sequence):
    """Records of a ``datasets`` dataset (a folder saved with ``save_to_disk`` or a Hub id), read lazily."""

    def __init__(self, name_or_path: str, image_column: str = "image", caption_column: str = "text"):
        try:
            import datasets
        except ImportError as error:
            raise DataError(
                f"--data {name_or_path!r} is not a folder of images; reading a datasets dataset needs "
                "`pip install datasets`"
            ) from error
        try:
            if _is_saved_dataset(Path(name_or_path)):
                dataset = datasets.load_from_disk(name_or_path)
            else:
                dataset = datasets.load_dataset(name_or_path, split="train")
        except (OSError, ConnectionError, ValueError) as error:  # not found, offline, not a dataset
            raise DataError(
                load_failure_message(
                    "the --data dataset", name_or_path, error, "dataset_info.json and its data files"
                )
            ) from error
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"]
        for column in (image_column, caption_column):
            if column not in dataset.column_names:
                raise DataError(
                    f"dataset {name_or_path!r} has no column {column!r} (columns: {dataset.column_names}); "
                    "pick them with --image-column / --caption-column"
                )
        if len(dataset) == 0:
            raise DataError(f"dataset {name_or_path!r} is empty")
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        row = self.dataset[index]
        return Record(row[self.image_column], str(row[self.caption_column] or ""))


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists())


def open_source(data: str, caption_column: str, image_column: str, allow_missing_captions: bool) -> Sequence:
    """An image folder when ``data`` is one (or is missing), else a ``datasets`` dataset (saved or Hub id)."""
    path = Path(data)
    looks_like_hub_id = not path.exists() and not os.path.isabs(data) and data.count("/") == 1
    if _is_saved_dataset(path) or looks_like_hub_id:
        return HFDatasetSource(data, image_column, caption_column)
    return ImageCaptionSource(path, caption_column, allow_missing_captions)


def read_caption_text(path: Path) -> str:
    """A caption file's text (UTF-8), refused with the file and the first bad byte's offset otherwise."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"caption file {str(path)!r} is not UTF-8 text: byte {error.start} (0x{error.object[error.start]:02x}) "
            "cannot be decoded; save it as UTF-8"
        ) from error
    except OSError as error:
        raise DataError(f"cannot read caption file {str(path)!r}: {error.strerror or error}") from error


def load_image(image: Any) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, or a datasets image dict (bytes or path)."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, dict):
        if image.get("bytes"):
            import io

            with Image.open(io.BytesIO(image["bytes"])) as opened:
                return to_rgb(opened)
        image = image.get("path")
    with Image.open(image) as opened:
        return to_rgb(opened)


UNREADABLE_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def check_some_image_readable(source: Sequence, data: str) -> None:
    """Refuse data of which no image can be read, before training (which would then never make a step).

    Images are tried in order until one opens, so a usable data set costs one image.
    """
    first_error = None
    for index in range(len(source)):
        record = source[index]
        try:
            load_image(record.image)
            return
        except UNREADABLE_IMAGE_ERRORS as error:
            first_error = first_error or (record.image, error)
    where, error = first_error if first_error else ("?", "no images")
    raise DataError(
        f"none of the {len(source)} images in --data {data!r} can be read; the first, {where}, failed: {error}. "
        "Check that the files are PNG, JPEG, WebP or BMP images"
    )


def resize_and_crop(
    image: Image.Image, resolution: int, rng: np.random.Generator | None
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Short side to ``resolution`` (aspect kept), then a square crop: random with ``rng``, else centred.

    Returns the pixels (H, W, 3 uint8), the original (height, width), and the crop's (top, left) in the
    resized image, as SD-XL's micro-conditioning expects.
    """
    width, height = image.size
    scale = resolution / min(width, height)
    new_width, new_height = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    if rng is None:
        top, left = (new_height - resolution) // 2, (new_width - resolution) // 2
    else:
        top = int(rng.integers(0, new_height - resolution + 1))
        left = int(rng.integers(0, new_width - resolution + 1))
    pixels = np.asarray(resized.crop((left, top, left + resolution, top + resolution)))
    return pixels, (height, width), (top, left)


class DistillDataset(torch.utils.data.Dataset):
    """Cropped training images in [-1, 1] with captions and SD-XL micro-conditioning.

    An unreadable image yields ``{"index", "unreadable"}`` (why); :func:`collate` drops it and lists it,
    so one bad file never stops a run and the trainer warns about it once (not once per epoch).
    """

    def __init__(self, source: Sequence, resolution: int, random_crop: bool = True, seed: int = 0):
        self.source = source
        self.resolution = resolution
        self.random_crop = random_crop
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        try:
            image = load_image(record.image)
        except UNREADABLE_IMAGE_ERRORS as error:
            return {"index": index, "unreadable": f"{record.image}: {error}"}
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.random_crop else None
        pixels, original_size, crop_top_left = resize_and_crop(image, self.resolution, rng)
        tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
        return {
            "index": index,
            "pixel_values": tensor,
            "caption": record.caption,
            "time_ids": torch.tensor([*original_size, *crop_top_left, self.resolution, self.resolution]),
        }


def collate(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack a batch, dropping unreadable images: counted in ``skipped``, listed in ``unreadable``."""
    kept = [item for item in items if item is not None and "unreadable" not in item]
    unreadable = {
        item["index"]: item["unreadable"] for item in items if item is not None and "unreadable" in item
    }
    batch: dict[str, Any] = {"skipped": len(items) - len(kept), "unreadable": unreadable}
    if not kept:
        return batch
    batch["index"] = [item["index"] for item in kept]
    batch["caption"] = [item["caption"] for item in kept]
    batch["time_ids"] = torch.stack([item["time_ids"] for item in kept])
    for key in ("pixel_values", "latent_mean", "latent_std"):
        if key in kept[0]:
            batch[key] = torch.stack([item[key] for item in kept])
    return batch


class CachedLatentDataset(torch.utils.data.Dataset):
    """Latent distributions (mean, std) encoded once by the VAE, with captions and micro-conditioning."""

    def __init__(self, cache: dict[str, Any]):
        self.cache = cache

    def set_epoch(self, epoch: int) -> None:  # crops were fixed when the cache was built
        pass

    def __len__(self) -> int:
        return len(self.cache["caption"])

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if not self.cache["valid"][index]:
            return None
        return {
            "index": index,
            "latent_mean": self.cache["mean"][index],
            "latent_std": self.cache["std"][index],
            "caption": self.cache["caption"][index],
            "time_ids": self.cache["time_ids"][index],
        }


def epoch_order(length: int, epoch: int, seed: int, rank: int, world_size: int, batch_size: int) -> list[int]:
    """This rank's sample indices for ``epoch``: a seeded permutation, split evenly across ranks.

    Every rank gets the same number of full batches, so no rank waits on another at a gradient sync.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    permutation = torch.randperm(length, generator=generator).tolist()
    per_rank = (length // (world_size * batch_size)) * batch_size
    return permutation[rank * per_rank : (rank + 1) * per_rank]
