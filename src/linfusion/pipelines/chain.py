"""Stage chains: generate at the model's native size, then enlarge in stages that each refine the last.

Every high-resolution recipe here (SDEdit, DemoFusion, super-resolution) is a list of :class:`Stage`\\ s
run by :func:`run_chain`: the base stage is text-to-image at the native size (or an input image), each
later stage enlarges the previous image and refines it at a decreasing strength. What differs between
recipes is only the refine step (:class:`ChainSteps`). The runner applies each stage's memory savers
(:func:`linfusion.patches.stage.apply_savers`), labels the progress bar, saves stage images and calls
``on_stage_end``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..choices import SIZE_MULTIPLE
from ..io import atomic_file
from ..model import denoiser_of
from ..patches.stage import Savers, apply_savers
from ..planner import MemoryPlan
from ..registry import is_dit
from . import dit

DEFAULT_TILE_FROM = 2048 * 2048  # without a memory plan: exact VAE tiling from this many pixels

StageCallback = Callable[[int, "Stage", Image.Image], None]


@dataclass(frozen=True)
class Stage:
    width: int
    height: int
    strength: float | None  # None: the base text-to-image generation

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def round_size(value: float) -> int:
    """The nearest positive multiple of 8 (the VAE works in blocks of 8 pixels)."""
    return max(SIZE_MULTIPLE, int(round(value / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


def check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0 or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise ValueError(
            f"size {width}x{height}: width and height must be positive multiples of {SIZE_MULTIPLE} "
            f"(e.g. {round_size(width)}x{round_size(height)})"
        )


def default_strengths(count: int, sdxl: bool) -> list[float]:
    """SD-1.x/2.x: 0.4 down to 0.1 (0.4, 0.3, 0.2, 0.1 for four stages); SD-XL: linspace(0.32, 0, n + 1)."""
    if count <= 0:
        return []
    if sdxl:
        return [round(float(s), 6) for s in np.linspace(0.32, 0.0, count + 1)[:count]]
    if count == 1:
        return [0.4]
    return [round(float(s), 6) for s in np.linspace(0.4, 0.1, count)]


def plan_stages(
    width: int,
    height: int,
    base_long_side: int,
    sdxl: bool = False,
    stages: int | None = None,
    strengths: Sequence[float] | None = None,
    start: tuple[int, int] | None = None,
) -> list[Stage]:
    """The base generation (unless ``start`` gives an input image size) and the enlargement stages.

    The base keeps the target's aspect ratio with its long side at ``base_long_side``. Without ``stages``
    each stage doubles the size and a last partial stage reaches a target that doubling does not;
    with ``stages`` the sizes grow geometrically from the base to the target in that many steps.
    """
    check_size(width, height)
    plan: list[Stage] = []
    if start is None:
        scale = base_long_side / max(width, height)
        current = (min(width, round_size(width * scale)), min(height, round_size(height * scale)))
        plan.append(Stage(*current, None))
    else:
        current = (round_size(start[0]), round_size(start[1]))
    sizes: list[tuple[int, int]] = []
    if stages is None:
        while current[0] * 2 <= width and current[1] * 2 <= height:
            current = (current[0] * 2, current[1] * 2)
            sizes.append(current)
        if current != (width, height):
            sizes.append((width, height))
    else:
        base_w, base_h = current
        for index in range(1, stages + 1):
            fraction = index / stages
            sizes.append(
                (
                    round_size(base_w * (width / base_w) ** fraction),
                    round_size(base_h * (height / base_h) ** fraction),
                )
            )
        sizes[-1] = (width, height)
    strengths = list(strengths) if strengths is not None else default_strengths(len(sizes), sdxl)
    if len(strengths) != len(sizes):
        raise ValueError(f"{len(sizes)} enlargement stages need {len(sizes)} strengths; got {len(strengths)}")
    if any(not 0.0 < s <= 1.0 for s in strengths):
        raise ValueError(f"strengths must be in (0, 1]; got {strengths}")
    plan.extend(Stage(w, h, s) for (w, h), s in zip(sizes, strengths))
    return plan


def stage_steps(num_inference_steps: int, strength: float) -> int:
    """img2img runs ``int(steps x strength)`` steps: ask for enough that low strengths keep one."""
    return max(num_inference_steps, math.ceil(1.0 / strength) + 1)


def denoising_steps(stage: Stage, num_inference_steps: int) -> int:
    """The denoising steps ``stage`` runs: all of them for the base, ``int(asked x strength)`` of the
    :func:`stage_steps` asked for in an enlargement stage (as diffusers' img2img counts them)."""
    if stage.strength is None:
        return num_inference_steps
    asked = stage_steps(num_inference_steps, stage.strength)
    return min(int(asked * stage.strength), asked)


def unet_calls(stage: Stage, steps: int, mode: str) -> int:
    """UNet calls of a stage: its denoising steps (as diffusers' img2img counts them), twice with DemoFusion's
    dilated branch."""
    if stage.strength is None:
        return steps
    return denoising_steps(stage, steps) * (2 if mode == "demofusion" else 1)


def native_long_side(pipe: Any) -> int:
    """The long side, in pixels, of the images the pipeline's denoiser (UNet or transformer) was trained at."""
    unet = getattr(pipe, "unet", None)
    denoiser = unet if unet is not None else denoiser_of(pipe)
    return int(denoiser.config.sample_size * pipe.vae_scale_factor)


def minimum_side(pipe: Any) -> int:
    """The smallest width and height, in pixels, the pipeline works at: one latent row and column at the
    UNet's deepest level (each down block but the last halves the latent image); one patch for a DiT."""
    unet = getattr(pipe, "unet", None)
    if unet is None:  # a diffusion transformer
        return int(pipe.vae_scale_factor * denoiser_of(pipe).config.patch_size)
    halvings = len(unet.config.down_block_types) - 1
    return int(pipe.vae_scale_factor * 2**halvings)


def text_to_image(pipe: Any, width: int, height: int, **options: Any) -> Image.Image:
    """The pipeline's text-to-image at exactly ``width`` x ``height`` (a DiT's: :func:`.dit.text_to_image`,
    with ``callback_on_step_end`` as for Stable Diffusion)."""
    if is_dit(pipe):
        return dit.text_to_image(pipe, width=width, height=height, **options)
    return pipe(width=width, height=height, **options).images[0]


def image_to_image_pipeline(pipe: Any) -> Any:
    """The image-to-image sibling sharing ``pipe``'s components; a DiT's refine steps run on ``pipe`` itself
    (diffusers has no PixArt image-to-image pipeline: :func:`.dit.image_to_image`)."""
    if is_dit(pipe):
        return pipe
    from diffusers import AutoPipelineForImage2Image

    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    carry_progress_config(pipe, img2img)
    return img2img


def set_progress_label(pipe: Any, label: str) -> None:
    """Show ``label`` on the pipeline's progress bar, keeping its other settings (e.g. ``disable``)."""
    config = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    config["desc"] = label
    pipe.set_progress_bar_config(**config)


def carry_progress_config(source: Any, target: Any) -> None:
    """Give ``target`` the progress-bar settings of ``source`` (``from_pipe`` does not carry them over)."""
    config = getattr(source, "_progress_bar_config", None)
    if config:
        target.set_progress_bar_config(**config)


class ChainSteps(Protocol):
    """What a recipe does in its stages; the runner does everything around them."""

    def base(self, pipe: Any, stage: Stage) -> Image.Image:
        """Text-to-image at the native size."""

    def refine(self, img2img: Any, stage: Stage, previous: Image.Image, resized: Image.Image) -> Image.Image:
        """Make the ``stage`` image from the previous one (``resized``: it, enlarged to the stage's size)."""


def chain_stages(
    pipe: Any,
    width: int,
    height: int,
    image: Image.Image | None = None,
    stages: int | None = None,
    strengths: Sequence[float] | None = None,
    base_long_side: int | None = None,
    sdxl: bool = False,
) -> list[Stage]:
    """The stages of a chain to ``width`` x ``height`` on ``pipe`` (from ``image`` when given)."""
    return plan_stages(
        width,
        height,
        base_long_side or native_long_side(pipe),
        sdxl=sdxl,
        stages=stages,
        strengths=strengths,
        start=image.size if image is not None else None,
    )


def run_chain(
    pipe: Any,
    plan: Sequence[Stage],
    steps: ChainSteps,
    image: Image.Image | None = None,
    memory_plan: MemoryPlan | None = None,
    exact_vae_tiling_from: int | None = DEFAULT_TILE_FROM,
    save_stages: str | Path | None = None,
    on_stage_end: StageCallback | None = None,
) -> Image.Image:
    """Run ``plan`` with ``steps``; returns the last stage's image.

    With ``memory_plan`` (one :class:`~linfusion.planner.StagePlan` per stage) each stage runs with the
    savers its plan chose; without one, the VAE tiles exactly from ``exact_vae_tiling_from`` pixels (None:
    never). ``save_stages`` writes ``stage-<i>-<W>x<H>.png`` per stage; ``on_stage_end(index, stage,
    image)`` is called after each stage (previews, timings).
    """
    if memory_plan is not None and len(memory_plan.stages) != len(plan):
        raise ValueError(f"the memory plan has {len(memory_plan.stages)} stages; this chain has {len(plan)}")
    folder = Path(save_stages) if save_stages is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    img2img = image_to_image_pipeline(pipe)
    current = image.convert("RGB") if image is not None else None
    for index, stage in enumerate(plan):
        label = f"stage {index + 1}/{len(plan)} {stage.width}x{stage.height}"
        if memory_plan is not None:
            savers = memory_plan.stages[index].savers
        else:
            pixels = stage.width * stage.height
            savers = Savers(tiled_vae=exact_vae_tiling_from is not None and pixels >= exact_vae_tiling_from)
        with apply_savers(pipe, savers):
            if stage.strength is None:
                set_progress_label(pipe, label)
                current = steps.base(pipe, stage)
            else:
                if current is None:
                    raise ValueError("an enlargement stage needs an image: start the plan with a base stage")
                set_progress_label(img2img, label)
                resized = current.resize(stage.size, Image.Resampling.LANCZOS)
                current = steps.refine(img2img, stage, current, resized)
        if folder is not None:
            with atomic_file(folder / f"stage-{index + 1}-{stage.width}x{stage.height}.png") as handle:
                current.save(handle, format="PNG")
        if on_stage_end is not None:
            on_stage_end(index, stage, current)
    assert current is not None
    return current


__all__ = [
    "ChainSteps",
    "Stage",
    "chain_stages",
    "carry_progress_config",
    "check_size",
    "default_strengths",
    "denoising_steps",
    "image_to_image_pipeline",
    "minimum_side",
    "native_long_side",
    "plan_stages",
    "round_size",
    "run_chain",
    "set_progress_label",
    "stage_steps",
    "text_to_image",
    "unet_calls",
]
