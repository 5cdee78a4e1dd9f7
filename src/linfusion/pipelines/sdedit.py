"""SDEdit chains: generate at the model's native size, then enlarge in stages, each re-noised and denoised.

Each stage resizes the previous image to the next size and runs image-to-image at a decreasing strength
(0.4, 0.3, 0.2, 0.1 for SD-1.x/2.x; linspace(0.32, 0, n + 1) for SD-XL), so the layout comes from the
native-size image and the detail from every stage. With LinFusion mounted each stage costs time linear
in its pixel count. Works on any diffusers SD-1.x/2.x/XL text-to-image pipeline and on PixArt-Alpha/Sigma
(whose image-to-image step is :mod:`linfusion.pipelines.dit`'s).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..planner import MemoryPlan
from ..registry import is_dit, is_sdxl
from . import dit
from .chain import (
    DEFAULT_TILE_FROM,
    Stage,
    StageCallback,
    chain_stages,
    run_chain,
    stage_steps,
    text_to_image,
)


class SDEditSteps:
    """The SDEdit recipe: plain text-to-image, then image-to-image at each stage's strength (on a DiT:
    :func:`linfusion.pipelines.dit.image_to_image`)."""

    def __init__(self, common: dict[str, Any]) -> None:
        self.common = common

    def base(self, pipe: Any, stage: Stage) -> Image.Image:
        return text_to_image(pipe, stage.width, stage.height, **self.common)

    def refine(self, img2img: Any, stage: Stage, previous: Image.Image, resized: Image.Image) -> Image.Image:
        assert stage.strength is not None
        steps = stage_steps(self.common["num_inference_steps"], stage.strength)
        kwargs = {**self.common, "num_inference_steps": steps}
        if is_dit(img2img):
            return dit.image_to_image(img2img, resized, strength=stage.strength, **kwargs)
        return img2img(image=resized, strength=stage.strength, **kwargs).images[0]


def sdedit(
    pipe: Any,
    prompt: str,
    width: int,
    height: int,
    negative_prompt: str | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    image: Image.Image | None = None,
    stages: int | None = None,
    strengths: Sequence[float] | None = None,
    base_long_side: int | None = None,
    save_stages: str | Path | None = None,
    callback_on_step_end: Callable | None = None,
    exact_vae_tiling_from: int | None = DEFAULT_TILE_FROM,
    memory_plan: MemoryPlan | None = None,
    on_stage_end: StageCallback | None = None,
    stage_plan: Sequence[Stage] | None = None,
    **pipeline_kwargs: Any,
) -> Image.Image:
    """Generate (or, with ``image``, enlarge) an image of ``width`` x ``height`` by an SDEdit chain.

    ``pipe`` is a text-to-image pipeline; its image-to-image sibling shares the same components, so a
    mounted LinFusion serves every stage. As in diffusers, a stage of strength s runs about
    ``num_inference_steps * s`` denoising steps (at least one). ``memory_plan``, ``exact_vae_tiling_from``,
    ``save_stages`` and ``on_stage_end``: see :func:`linfusion.pipelines.chain.run_chain`. ``stage_plan``:
    the stages when the caller computed them already (else from the size, ``image``, ``stages``, ``strengths``).
    """
    plan = (
        list(stage_plan)
        if stage_plan is not None
        else chain_stages(pipe, width, height, image, stages, strengths, base_long_side, sdxl=is_sdxl(pipe))
    )
    common = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "generator": generator,
        "callback_on_step_end": callback_on_step_end,
        **pipeline_kwargs,
    }
    return run_chain(
        pipe,
        plan,
        SDEditSteps(common),
        image=image,
        memory_plan=memory_plan,
        exact_vae_tiling_from=exact_vae_tiling_from,
        save_stages=save_stages,
        on_stage_end=on_stage_end,
    )


__all__ = ["SDEditSteps", "sdedit"]
