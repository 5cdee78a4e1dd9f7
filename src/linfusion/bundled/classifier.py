"""A small CNN that reads a shapes image back into its labels, to score generated images.

It predicts the background colour and, for each of the three slots (left, center, right), whether the
slot holds a shape and which, its colour and its size. Scoring a generated image against the scene
its caption describes gives per-attribute accuracies: the quality gates of the bundled teacher and
of its LinFusion student. Inputs of any size are resized to the training size first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import shapes
from .paths import CLASSIFIER_DIR, IMAGE_SIZE

N_SLOTS = len(shapes.POSITIONS)
N_SHAPES = len(shapes.SHAPES) + 1  # + "empty slot"
N_COLOURS = len(shapes.COLOURS)
N_SIZES = len(shapes.SIZES)
N_BACKGROUNDS = len(shapes.BACKGROUNDS)
_PER_SLOT = N_SHAPES + N_COLOURS + N_SIZES


class ShapesClassifier(nn.Module):
    """Four conv stages (32 -> 4 px) and linear heads on the flattened map (keeps where things are)."""

    def __init__(self, width: int = 32, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.image_size = image_size
        self.width = width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.features = nn.Sequential(
            block(3, width, 1),
            block(width, 2 * width, 2),
            block(2 * width, 2 * width, 2),
            block(2 * width, 4 * width, 2),
        )
        flat = 4 * width * (image_size // 8) ** 2
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(flat, 256), nn.SiLU())
        self.head = nn.Linear(256, N_BACKGROUNDS + N_SLOTS * _PER_SLOT)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, H, W) in [-1, 1] -> logits: background (B, 4), shape/colour/size (B, 3, K)."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True
            )
        out = self.head(self.hidden(self.features(images)))
        background, slots = out[:, :N_BACKGROUNDS], out[:, N_BACKGROUNDS:].view(-1, N_SLOTS, _PER_SLOT)
        return {
            "background": background,
            "shape": slots[..., :N_SHAPES],
            "colour": slots[..., N_SHAPES : N_SHAPES + N_COLOURS],
            "size": slots[..., N_SHAPES + N_COLOURS :],
        }


def load_classifier(folder: str | os.PathLike = CLASSIFIER_DIR) -> ShapesClassifier:
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = ShapesClassifier(config["width"], config["image_size"])
    state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def predict(model: ShapesClassifier, images: Any, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Predicted labels (same layout as ``shapes.stack_labels``) of uint8 HWC arrays or [-1, 1] tensors.

    Also ``occupied`` (probability that each slot holds a shape) and ``shape_if_any`` (the most likely
    shape, 1-based, ignoring the "empty" class), for reading objects drawn off their slot.
    """
    x = images if isinstance(images, torch.Tensor) else shapes.to_tensor(np.asarray(images))
    keys = ("background", "shape", "colour", "size", "occupied", "shape_if_any")
    outputs: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    for chunk in x.float().split(batch_size):
        logits = model(chunk)
        for key in ("background", "shape", "colour", "size"):
            outputs[key].append(logits[key].argmax(-1).numpy())
        outputs["occupied"].append(1 - logits["shape"].softmax(-1)[..., 0].numpy())
        outputs["shape_if_any"].append(logits["shape"][..., 1:].argmax(-1).numpy() + 1)
    return {key: np.concatenate(value) for key, value in outputs.items()}


def score(images: Any, scenes: list[shapes.Scene], model: ShapesClassifier | None = None) -> dict[str, float]:
    """Per-attribute accuracies of images against the scenes they should show.

    Strict, per object at the object's own slot: ``shape``, ``colour``, ``size``, ``object`` (all three
    right); ``position``: the slot holds some shape. Per image: ``background``; ``count`` (number of
    non-empty slots). Position-free, over one-object scenes only: ``found_shape``, ``found_colour``,
    ``found_size`` read at the slot most likely occupied (NaN when there is no one-object scene). The
    teacher's gates use ``background``, ``found_colour`` and ``found_shape``: "the object's colour and
    shape", wherever it was drawn.
    """
    if model is None:
        model = load_classifier()
    predicted = predict(model, images)
    truth = shapes.stack_labels(scenes)
    present = truth["shape"] > 0
    result = {
        "background": float((predicted["background"] == truth["background"]).mean()),
        "count": float(((predicted["shape"] > 0).sum(1) == present.sum(1)).mean()),
        "position": float((predicted["shape"][present] > 0).mean()),
    }
    correct = {}
    for key in ("shape", "colour", "size"):
        correct[key] = predicted[key][present] == truth[key][present]
        result[key] = float(correct[key].mean())
    result["object"] = float((correct["shape"] & correct["colour"] & correct["size"]).mean())
    single = np.flatnonzero(present.sum(1) == 1)
    found_slot = predicted["occupied"][single].argmax(1)
    true_slot = present[single].argmax(1)
    for key, predicted_key in (("shape", "shape_if_any"), ("colour", "colour"), ("size", "size")):
        guess = predicted[predicted_key][single, found_slot]
        result[f"found_{key}"] = (
            float((guess == truth[key][single, true_slot]).mean()) if len(single) else float("nan")
        )
    result["n_images"] = float(len(scenes))
    return result
