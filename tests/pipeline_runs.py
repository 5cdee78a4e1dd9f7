"""Running tiny pipelines deterministically, for the pipeline-level tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

SIZE = 32


def random_image(seed: int = 0, size: int = SIZE) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def run(pipe: Any, task: str = "text2img", seed: int = 0, steps: int = 2, **extra: Any) -> np.ndarray:
    """One seeded generation at 32x32 (latents 16x16), returned as a float array in [0, 1]."""
    kwargs: dict[str, Any] = {
        "prompt": "a red circle on a blue background",
        "num_inference_steps": steps,
        "output_type": "np",
        "generator": torch.Generator().manual_seed(seed),
    }
    if task == "text2img":
        kwargs.update(height=SIZE, width=SIZE)
    elif task == "img2img":
        kwargs.update(image=random_image(seed), strength=0.75)
    elif task == "inpaint":
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[:, SIZE // 2 :] = 255
        kwargs.update(
            image=random_image(seed), mask_image=Image.fromarray(mask), strength=1.0, height=SIZE, width=SIZE
        )
    else:
        raise ValueError(task)
    kwargs.update(extra)
    return pipe(**kwargs).images
