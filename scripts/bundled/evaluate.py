"""Quality gates of the bundled teacher: does it draw what its held-out captions say?

Two measurements, both on held-out scenes: the classifier's accuracies on images generated from
one-object captions (background colour, object colour, shape, position), and the prompted versus
unconditional denoising error (a dead conditioning path shows up as equal errors).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from linfusion.bundled import classifier as classifier_lib
from linfusion.bundled import shapes
from linfusion.registry import is_dit

from . import training

# Keys of ``classifier.score``: background colour, and the one object's colour and shape wherever it is.
GATES = {"background": 0.80, "found_colour": 0.70, "found_shape": 0.70}


def heldout_scenes(n: int, n_objects: int | None = 1, start: int = 0) -> list[shapes.Scene]:
    """Scenes of held-out seeds ``start .. start + n`` (one object each by default)."""
    return [shapes.scene_for_seed(shapes.split_seed(start + i, "heldout"), n_objects) for i in range(n)]


@torch.no_grad()
def generate(
    pipe: Any,
    prompts: list[str],
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 4.0,
    size: int | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """uint8 (N, H, W, 3) images, image i from a generator seeded with ``seed + i``.

    PixArt pipelines get the exact size (no resolution binning) and the raw caption (no cleaning).
    """
    extra = {"use_resolution_binning": False, "clean_caption": False} if is_dit(pipe) else {}
    images = []
    for begin in range(0, len(prompts), batch_size):
        chunk = prompts[begin : begin + batch_size]
        generators = [torch.Generator().manual_seed(seed + begin + i) for i in range(len(chunk))]
        out = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=size,
            width=size,
            output_type="np",
            **extra,
        ).images
        images.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(images)


def caption_scores(
    pipe: Any,
    n: int = 96,
    classifier: Any = None,
    steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
) -> dict[str, float]:
    """Classifier accuracies of images generated from ``n`` held-out one-object captions."""
    scenes = heldout_scenes(n)
    images = generate(pipe, [scene.caption() for scene in scenes], seed, steps, guidance_scale)
    return classifier_lib.score(images, scenes, classifier)


def conditioning_gap(
    pipe: Any, n: int = 64, timesteps: tuple[int, ...] = (300, 500, 700, 900)
) -> dict[str, float]:
    """Prompted and unconditional denoising errors of the pipeline's UNet or transformer on held-out latents."""
    scenes = heldout_scenes(n, n_objects=None, start=10_000)
    images = np.stack([shapes.render(scene, pipe.vae.config.sample_size) for scene in scenes])
    x = shapes.to_tensor(images).to(pipe.vae.dtype)
    latents = pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor
    if is_dit(pipe):
        from .dit_training import dit_conditioning_errors

        return dit_conditioning_errors(
            pipe.transformer,
            pipe.text_encoder,
            pipe.tokenizer,
            pipe.scheduler,
            latents,
            [scene.caption() for scene in scenes],
            list(timesteps),
        )
    return training.conditioning_errors(
        pipe.unet,
        pipe.text_encoder,
        pipe.tokenizer,
        pipe.scheduler,
        latents,
        [scene.caption() for scene in scenes],
        list(timesteps),
    )


def passes_gates(scores: dict[str, float]) -> bool:
    return all(scores[key] >= threshold for key, threshold in GATES.items())
