"""A procedural caption-to-image data set of coloured shapes, deterministic by seed.

It exists so that the project can train, distil and score a small text-to-image model fully offline.
Every image is a background colour plus one to three shapes, each in its own horizontal slot
(left / center / right); the caption is generated from the scene with a fixed grammar, and the scene
keeps structured labels, so a classifier (and the quality report) can score generated images against
the caption they were prompted with.

Object and background colours come from separate palettes, so that a colour word says by itself
whether it names an object or the background: that keeps the binding problem small enough for a
model trained for a couple of hours on one CPU core.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 135, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (22, 22, 22),
    "white": (238, 238, 238),
    "gray": (128, 128, 128),
    "brown": (115, 75, 45),
}
POSITIONS: tuple[str, ...] = ("left", "center", "right")
SIZES: tuple[str, ...] = ("small", "large")

# Geometry, as fractions of the image side: slot centres, object extents, jitter.
_SLOT_X = {"left": 0.2, "center": 0.5, "right": 0.8}
_EXTENT = {"small": 0.2, "large": 0.32}
_JITTER_X = 0.02
_Y_RANGE = (0.32, 0.68)
_SUPERSAMPLE = 4

# Train / held-out split by seed: held-out scenes use seeds from HELDOUT_OFFSET on.
HELDOUT_OFFSET = 1_000_000_000
SPLITS: tuple[str, ...] = ("train", "heldout")
# Probability of 1, 2 and 3 objects: one-object scenes dominate because they are what the gates score.
OBJECT_COUNT_PROBS: tuple[float, float, float] = (0.5, 0.3, 0.2)

_PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}


@dataclass(frozen=True)
class ShapeObject:
    """One shape of a scene: its words, plus the continuous jitter used to draw it."""

    shape: str
    colour: str
    size: str
    position: str
    dx: float = 0.0
    cy: float = 0.5

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {_PHRASE[self.position]}"


@dataclass(frozen=True)
class Scene:
    """A background colour and 1-3 objects sorted left to right (at most one per slot)."""

    background: str
    objects: tuple[ShapeObject, ...]

    def caption(self) -> str:
        return caption(self)

    def slot(self, position: str) -> ShapeObject | None:
        for obj in self.objects:
            if obj.position == position:
                return obj
        return None


def vocabulary() -> list[str]:
    """Every word a caption can contain, so a tokenizer can give each one a single token."""
    words = {"a", "and", "on", "in", "the", "background", ","}
    for phrase in _PHRASE.values():
        words.update(phrase.split())
    words.update(SHAPES, COLOURS, BACKGROUNDS, SIZES)
    return sorted(words)


def unknown_words(prompt: str) -> list[str]:
    """The words of ``prompt`` that no caption contains, each once, in order (punctuation and digits are
    not words here; case is ignored, as the model's tokenizer lowercases)."""
    known = set(vocabulary())
    unknown: list[str] = []
    for word in re.findall(r"[^\W\d_]+", prompt.lower()):
        if word not in known and word not in unknown:
            unknown.append(word)
    return unknown


def vocabulary_warning(prompt: str) -> str | None:
    """One line saying which words of ``prompt`` the bundled model never saw, and what it knows; None
    when it knows them all."""
    unknown = unknown_words(prompt)
    if not unknown:
        return None
    groups = {
        "colours": COLOURS,
        "shapes": SHAPES,
        "sizes": SIZES,
        "positions": _PHRASE.values(),
        "backgrounds": BACKGROUNDS,
    }
    known = ", ".join(f"{group} ({'/'.join(words)})" for group, words in groups.items())
    return (
        f"the bundled model does not know {', '.join(repr(word) for word in unknown)}: it was trained on "
        f'captions of coloured shapes only, with {known}, e.g. "a large red circle in the center , on a '
        'white background"'
    )


def caption(scene: Scene) -> str:
    """The caption of a scene: objects left to right, joined by 'and', then the background."""
    objects = " and ".join(obj.phrase() for obj in scene.objects)
    return f"{objects} , on a {scene.background} background"


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """Draw a random scene; ``n_objects`` (1-3) fixes the object count."""
    if n_objects is None:
        n_objects = int(rng.choice(3, p=OBJECT_COUNT_PROBS)) + 1
    if not 1 <= n_objects <= len(POSITIONS):
        raise ValueError(f"n_objects must be 1..{len(POSITIONS)}, got {n_objects}")
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    slots = sorted(rng.choice(len(POSITIONS), size=n_objects, replace=False).tolist())
    colour_names = list(COLOURS)
    objects = []
    for slot in slots:
        objects.append(
            ShapeObject(
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                colour=colour_names[int(rng.integers(len(colour_names)))],
                size=SIZES[int(rng.integers(len(SIZES)))],
                position=POSITIONS[slot],
                dx=float(rng.uniform(-_JITTER_X, _JITTER_X)),
                cy=float(rng.uniform(*_Y_RANGE)),
            )
        )
    return Scene(background=background, objects=tuple(objects))


def split_seed(index: int, split: str = "train") -> int:
    """The seed of item ``index`` of a split (held-out seeds never collide with training ones)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= index < HELDOUT_OFFSET:
        raise ValueError(f"index must be in [0, {HELDOUT_OFFSET}), got {index}")
    return index if split == "train" else HELDOUT_OFFSET + index


def scene_for_seed(seed: int, n_objects: int | None = None) -> Scene:
    """The scene of a seed: the same seed always gives the same scene."""
    return sample_scene(np.random.default_rng(seed), n_objects)


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Draw a scene as an (size, size, 3) uint8 array (supersampled for anti-aliased edges)."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        extent = _EXTENT[obj.size] * big
        cx = (_SLOT_X[obj.position] + obj.dx) * big
        cy = obj.cy * big
        half = extent / 2
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
        elif obj.shape == "square":
            side = half * 0.88  # equal-looking area to the circle
            draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon(
                [(cx, cy - half), (cx + half * 1.05, cy + half * 0.85), (cx - half * 1.05, cy + half * 0.85)],
                fill=fill,
            )
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    if _SUPERSAMPLE > 1:
        image = image.resize((size, size), Image.Resampling.BOX)
    return np.array(image, dtype=np.uint8)


def render_seed(seed: int, size: int = 32, n_objects: int | None = None) -> tuple[np.ndarray, Scene]:
    """The image and the scene of a seed."""
    scene = scene_for_seed(seed, n_objects)
    return render(scene, size), scene


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) arrays -> float tensors (..., 3, H, W) in [-1, 1]."""
    array = np.asarray(images)
    tensor = torch.from_numpy(np.ascontiguousarray(array)).float().div_(127.5).sub_(1.0)
    return tensor.movedim(-1, -3).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float tensors (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3) arrays."""
    array = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().movedim(-3, -1)
    return array.to(dtype=torch.uint8).cpu().numpy()


def batch(
    seeds: Iterable[int], size: int = 32, n_objects: int | None = None
) -> tuple[np.ndarray, list[Scene]]:
    """Render many seeds: (N, size, size, 3) uint8 images and their scenes."""
    scenes = [scene_for_seed(int(seed), n_objects) for seed in seeds]
    images = np.stack([render(scene, size) for scene in scenes]) if scenes else np.zeros((0, size, size, 3))
    return images.astype(np.uint8), scenes


# Structured labels, for the classifier and the quality report.
NONE_SHAPE = 0  # shape label 0 means "no object in this slot"; shapes are 1..len(SHAPES)


def scene_labels(scene: Scene) -> dict[str, np.ndarray]:
    """Integer labels of a scene: background, and per slot (left, center, right) shape/colour/size.

    ``shape`` is 0 for an empty slot, else 1 + the index in SHAPES; ``colour`` and ``size`` are -1
    for an empty slot (ignored by the losses and the scores).
    """
    shape = np.zeros(len(POSITIONS), dtype=np.int64)
    colour = np.full(len(POSITIONS), -1, dtype=np.int64)
    size = np.full(len(POSITIONS), -1, dtype=np.int64)
    for obj in scene.objects:
        slot = POSITIONS.index(obj.position)
        shape[slot] = 1 + SHAPES.index(obj.shape)
        colour[slot] = list(COLOURS).index(obj.colour)
        size[slot] = SIZES.index(obj.size)
    return {
        "background": np.array(list(BACKGROUNDS).index(scene.background), dtype=np.int64),
        "shape": shape,
        "colour": colour,
        "size": size,
    }


def stack_labels(scenes: Sequence[Scene]) -> dict[str, np.ndarray]:
    """Labels of many scenes, stacked along a first batch axis."""
    per_scene = [scene_labels(scene) for scene in scenes]
    return {key: np.stack([labels[key] for labels in per_scene]) for key in per_scene[0]}


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (positions only, no jitter): the inverse of :func:`caption`.

    Lets the quality report score an image generated from a caption without keeping its scene.
    """
    words = text.replace(",", " , ").split()
    if len(words) < 5 or words[-4:-1] != ["on", "a", words[-2]] or words[-1] != "background":
        raise ValueError(f"not a shapes caption: {text!r}")
    background = words[-2]
    if background not in BACKGROUNDS or words[-5] != ",":
        raise ValueError(f"not a shapes caption: {text!r}")
    phrases = " ".join(words[:-5]).split(" and ")
    objects = []
    by_phrase = {v: k for k, v in _PHRASE.items()}
    for phrase in phrases:
        parts = phrase.split()
        if len(parts) != 7 or parts[0] != "a":
            raise ValueError(f"not a shapes object phrase: {phrase!r}")
        size, colour, shape = parts[1:4]
        position = by_phrase.get(" ".join(parts[4:]))
        if size not in SIZES or colour not in COLOURS or shape not in SHAPES or position is None:
            raise ValueError(f"not a shapes object phrase: {phrase!r}")
        objects.append(ShapeObject(shape=shape, colour=colour, size=size, position=position))
    return Scene(background=background, objects=tuple(objects))


class ShapesDataset(torch.utils.data.Dataset):
    """A torch ``Dataset`` of (image tensor in [-1, 1] of shape (3, size, size), caption).

    Item ``i`` is the scene of ``split_seed(start + i, split)``, so two datasets with the same
    arguments yield identical items, and held-out items never appear in training.
    """

    def __init__(
        self,
        length: int,
        size: int = 32,
        split: str = "train",
        start: int = 0,
        n_objects: int | None = None,
        return_scene: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.length = length
        self.size = size
        self.split = split
        self.start = start
        self.n_objects = n_objects
        self.return_scene = return_scene

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple:
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, scene = render_seed(split_seed(self.start + index, self.split), self.size, self.n_objects)
        tensor = to_tensor(image)
        if self.return_scene:
            return tensor, scene.caption(), scene
        return tensor, scene.caption()
