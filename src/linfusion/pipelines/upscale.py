"""Super-resolution: enlarge an existing image through SDEdit or DemoFusion stages."""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from .chain import round_size
from .demofusion import demofusion
from .sdedit import sdedit

CHAIN_MODES = ("sdedit", "demofusion")


def upscale_target(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The output size of enlarging an image of ``size`` by ``scale`` (multiples of 8)."""
    if not math.isfinite(scale) or math.isclose(scale, 1.0) or scale <= 1.0:
        raise ValueError(f"--scale must be > 1; got {scale}")
    return round_size(size[0] * scale), round_size(size[1] * scale)


def upscale(
    pipe: Any, image: Image.Image, scale: float, prompt: str = "", mode: str = "sdedit", **kwargs: Any
) -> Image.Image:
    """Super-resolution of ``image`` by ``scale`` through SDEdit (or ``mode="demofusion"``) stages.

    ``kwargs`` go to :func:`~linfusion.pipelines.sdedit` / :func:`~linfusion.pipelines.demofusion`.
    """
    chains = {"sdedit": sdedit, "demofusion": demofusion}
    if mode not in chains:
        raise ValueError(f"mode must be one of {', '.join(CHAIN_MODES)}; got {mode!r}")
    return chains[mode](pipe, prompt, *upscale_target(image.size, scale), image=image, **kwargs)


__all__ = ["CHAIN_MODES", "upscale", "upscale_target"]
