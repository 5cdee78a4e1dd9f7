"""A small CNN that reads a shapes image back into its labels, to score generated images.

It predicts the background colour and, for each of the three slots (left, center, right), whether the
slot holds a shape and which, its colour and its size. Scoring a generated image against the scene
its caption describes gives per-attribute accuracies: the quality gates of the bundled teacher and
of its LinFusion student. Inputs of any size are resized to the training size first.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linfusion.bundled import checkpoint as ckpt
from linfusion.bundled import components
from linfusion.data import shapes

N_SLOTS = len(shapes.POSITIONS)
N_SHAPES = len(shapes.SHAPES) + 1  # + "empty slot"
N_COLOURS = len(shapes.COLOURS)
N_SIZES = len(shapes.SIZES)
N_BACKGROUNDS = len(shapes.BACKGROUNDS)
_PER_SLOT = N_SHAPES + N_COLOURS + N_SIZES


class ShapesClassifier(nn.Module):
    """Four conv stages (32 -> 4 px) and linear heads on the flattened map (keeps where things are)."""

    def __init__(self, width: int = 32, image_size: int = components.IMAGE_SIZE) -> None:
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


def _loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.cross_entropy(logits["background"], labels["background"])
    loss = loss + F.cross_entropy(logits["shape"].reshape(-1, N_SHAPES), labels["shape"].reshape(-1))
    for key, classes in (("colour", N_COLOURS), ("size", N_SIZES)):
        loss = loss + F.cross_entropy(
            logits[key].reshape(-1, classes), labels[key].reshape(-1), ignore_index=-1
        )
    return loss


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise and blur of random strength: generated images are softer and noisier than renders."""
    sigma = torch.rand(x.shape[0], 1, 1, 1, generator=generator) * 0.12
    x = x + sigma * torch.randn(x.shape, generator=generator)
    blur = torch.rand(x.shape[0], generator=generator) < 0.4
    if blur.any():
        kernel = torch.tensor([0.25, 0.5, 0.25])
        kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return x.clamp(-1.2, 1.2)


def _labels(scenes: list[shapes.Scene]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in shapes.stack_labels(scenes).items()}


@dataclass
class ClassifierConfig:
    out_dir: str = str(components.CLASSIFIER_DIR)
    state_dir: str = "artifacts/bundled/classifier"
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 32
    image_size: int = components.IMAGE_SIZE
    seed: int = 0
    start_index: int = 500_000_000  # training seeds of its own, disjoint from the generator's
    log_every: int = 50
    checkpoint_every: int = 500


def train_classifier(config: ClassifierConfig, resume: bool = False, save: bool = True) -> Any:
    """Train on rendered training scenes; saves to ``out_dir`` (config.json + model.safetensors)."""
    torch.manual_seed(config.seed)
    model = ShapesClassifier(config.width, config.image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(config.seed)
    state_path = Path(config.state_dir) / "checkpoint.pt"
    state = ckpt.load(state_path) if resume and save else None
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ckpt.set_rng_state(generator, state["rng"])
        start = state["step"]
    log = ckpt.JsonlLog(Path(config.state_dir) / "log.jsonl", start if state else None) if save else None
    if log is not None and state is None:
        log.write({"event": "config", "step": 0, **asdict(config)})
    model.train()
    tick = time.perf_counter()
    losses: list[float] = []
    for step in range(start, config.steps):
        lr = config.lr * 0.5 * (1 + np.cos(np.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        seeds = [config.start_index + step * config.batch_size + i for i in range(config.batch_size)]
        images, scenes = shapes.batch(seeds, config.image_size)
        x = _augment(shapes.to_tensor(images), generator)
        loss = _loss(model(x), _labels(scenes))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        done = step + 1
        if log is not None and done % config.log_every == 0:
            now = time.perf_counter()
            log.write(
                {"step": done, "loss": float(np.mean(losses)), "s_per_step": (now - tick) / len(losses)}
            )
            losses, tick = [], now
        if save and (done % config.checkpoint_every == 0 or done == config.steps):
            ckpt.atomic_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": ckpt.rng_state(generator),
                    "step": done,
                },
                state_path,
            )
    model.eval()
    if save:
        save_classifier(model, config.out_dir)
        if log is not None:
            images, scenes = shapes.batch([shapes.split_seed(i, "heldout") for i in range(1000)])
            log.write(
                {"step": config.steps, **{f"heldout_{k}": v for k, v in score(images, scenes, model).items()}}
            )
    return model


def save_classifier(model: ShapesClassifier, folder: str | os.PathLike) -> Path:
    """config.json + fp16 model.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"width": model.width, "image_size": model.image_size}, indent=2) + "\n"
    )
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return folder


def load_classifier(folder: str | os.PathLike = components.CLASSIFIER_DIR) -> ShapesClassifier:
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
