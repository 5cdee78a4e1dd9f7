"""Training of the bundled shapes classifier (resumable), and its export in the package's format."""

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

from linfusion.bundled import shapes
from linfusion.bundled.classifier import (
    N_COLOURS,
    N_SHAPES,
    N_SIZES,
    ShapesClassifier,
    score,
)
from linfusion.bundled.paths import CLASSIFIER_DIR, IMAGE_SIZE

from . import checkpoint as ckpt


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
    out_dir: str = str(CLASSIFIER_DIR)
    state_dir: str = "artifacts/bundled/classifier"
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 32
    image_size: int = IMAGE_SIZE
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
    start = 0 if state is None else ckpt.restore_run(state, {"model": model}, optimizer, generator)
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
            ckpt.save_run(state_path, {"model": model}, optimizer, generator, done)
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
