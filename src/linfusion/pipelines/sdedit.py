"""SDEdit chains: generate at the model's native size, then enlarge in stages, each re-noised and denoised.

Each stage resizes the previous image to the next size and runs image-to-image at a decreasing strength
(SPEC section 5: 0.4, 0.3, 0.2, 0.1 for SD-1.x/2.x; linspace(0.32, 0, n + 1) for SD-XL), so the layout
comes from the native-size image and the detail from every stage. With LinFusion mounted each stage
costs time linear in its pixel count. Works on any diffusers SD-1.x/2.x/XL text-to-image pipeline.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..tiled_vae import disable_exact_tiling, enable_exact_tiling

SIZE_MULTIPLE = 8


@dataclass(frozen=True)
class Stage:
    width: int
    height: int
    strength: float | None  # None: the base text-to-image generation


def _round(value: float) -> int:
    return max(SIZE_MULTIPLE, int(round(value / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


def check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0 or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise ValueError(
            f"size {width}x{height}: width and height must be positive multiples of {SIZE_MULTIPLE} "
            f"(e.g. {_round(width)}x{_round(height)})"
        )


def default_strengths(count: int, sdxl: bool) -> list[float]:
    """SPEC 5: SD-1.x/2.x 0.4 -> 0.1 (0.4, 0.3, 0.2, 0.1 for four stages); SD-XL linspace(0.32, 0, n + 1)."""
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
        current = (min(width, _round(width * scale)), min(height, _round(height * scale)))
        plan.append(Stage(*current, None))
    else:
        current = (_round(start[0]), _round(start[1]))
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
                    _round(base_w * (width / base_w) ** fraction),
                    _round(base_h * (height / base_h) ** fraction),
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


def _is_sdxl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def _native_long_side(pipe: Any) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def _with_progress_desc(pipe: Any, desc: str) -> None:
    config = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    config["desc"] = desc
    pipe.set_progress_bar_config(**config)


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
    exact_vae_tiling_from: int | None = 2048 * 2048,
    memory_plan: Any = None,
    on_stage_end: Callable[[int, Stage, Image.Image], None] | None = None,
    **pipeline_kwargs: Any,
) -> Image.Image:
    """Generate (or, with ``image``, enlarge) an image of ``width`` x ``height`` by an SDEdit chain.

    ``pipe`` is a text-to-image pipeline; its image-to-image sibling shares the same components, so a
    mounted LinFusion serves every stage. As in diffusers, a stage of strength s runs about
    ``num_inference_steps * s`` denoising steps (at least one). With ``memory_plan`` (a
    :class:`linfusion.planner.MemoryPlan` for these stages) each stage runs with the savers its plan chose
    and ``exact_vae_tiling_from`` is ignored. ``exact_vae_tiling_from`` (pixels) switches the VAE to exact
    tiling for large stages (None: never). ``save_stages`` writes ``stage-<i>-<W>x<H>.png`` per stage;
    ``on_stage_end(index, stage, image)`` is called after each stage (previews, timings).
    """
    from diffusers import AutoPipelineForImage2Image

    plan, folder = chain_plan(
        pipe,
        width,
        height,
        image,
        stages,
        strengths,
        base_long_side,
        _is_sdxl(pipe),
        memory_plan,
        save_stages,
    )
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    common = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "generator": generator,
        "callback_on_step_end": callback_on_step_end,
        **pipeline_kwargs,
    }
    current = image.convert("RGB") if image is not None else None
    for index, stage in enumerate(plan):
        label = f"stage {index + 1}/{len(plan)} {stage.width}x{stage.height}"
        savers = memory_plan.stages[index].savers if memory_plan is not None else None
        with stage_memory(pipe, savers, stage.width * stage.height, exact_vae_tiling_from):
            if stage.strength is None:
                _with_progress_desc(pipe, label)
                current = pipe(width=stage.width, height=stage.height, **common).images[0]
            else:
                _with_progress_desc(img2img, label)
                resized = current.resize((stage.width, stage.height), Image.Resampling.LANCZOS)
                steps = stage_steps(num_inference_steps, stage.strength)
                stage_kwargs = {**common, "num_inference_steps": steps}
                current = img2img(image=resized, strength=stage.strength, **stage_kwargs).images[0]
        finish_stage(index, stage, current, folder, on_stage_end)
    return current


def chain_plan(
    pipe: Any,
    width: int,
    height: int,
    image: Image.Image | None,
    stages: int | None,
    strengths: Sequence[float] | None,
    base_long_side: int | None,
    sdxl: bool,
    memory_plan: Any,
    save_stages: str | Path | None,
) -> tuple[list[Stage], Path | None]:
    """The stages of a chain (checked against ``memory_plan``) and the folder for stage images."""
    plan = plan_stages(
        width,
        height,
        base_long_side or _native_long_side(pipe),
        sdxl=sdxl,
        stages=stages,
        strengths=strengths,
        start=image.size if image is not None else None,
    )
    if memory_plan is not None and len(memory_plan.stages) != len(plan):
        raise ValueError(f"the memory plan has {len(memory_plan.stages)} stages; this chain has {len(plan)}")
    folder = Path(save_stages) if save_stages is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    return plan, folder


def stage_steps(num_inference_steps: int, strength: float) -> int:
    """img2img runs ``int(steps x strength)`` steps: ask for enough that low strengths keep one."""
    return max(num_inference_steps, math.ceil(1.0 / strength) + 1)


def finish_stage(
    index: int, stage: Stage, image: Image.Image, folder: Path | None, on_stage_end: Callable | None
) -> None:
    if folder is not None:
        image.save(folder / f"stage-{index + 1}-{stage.width}x{stage.height}.png")
    if on_stage_end is not None:
        on_stage_end(index, stage, image)


@contextlib.contextmanager
def stage_memory(pipe: Any, savers: Any, pixels: int, exact_vae_tiling_from: int | None) -> Iterator[None]:
    """The savers a memory plan chose for one stage, or, without a plan, exact VAE tiling by size."""
    from ..memory import memory_savers

    tiled = (
        savers.tiled_vae
        if savers is not None
        else (exact_vae_tiling_from is not None and pixels >= exact_vae_tiling_from)
    )
    options = {}
    if savers is not None:
        options = {
            "feed_forward_chunk": savers.feed_forward_chunk,
            "sequential_cfg": savers.sequential_cfg,
            "skip_offload": "cpu" if savers.skip_offload else None,
        }
    offload = savers is not None and savers.model_offload
    device = pipe.unet.device
    if tiled:
        enable_exact_tiling(pipe.vae)
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    try:
        with memory_savers(pipe.unet, **options):
            yield
    finally:
        if tiled:
            disable_exact_tiling(pipe.vae)
        if offload:
            pipe.remove_all_hooks()
            pipe.to(device)


def upscale_target(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The output size of enlarging an image of ``size`` by ``scale`` (multiples of 8)."""
    if math.isclose(scale, 1.0) or scale <= 1.0:
        raise ValueError(f"--scale must be > 1; got {scale}")
    return _round(size[0] * scale), _round(size[1] * scale)


def upscale(
    pipe: Any, image: Image.Image, scale: float, prompt: str = "", mode: str = "sdedit", **kwargs: Any
) -> Image.Image:
    """Super-resolution of an existing image by ``scale`` through SDEdit (or ``mode="demofusion"``:
    DemoFusion) stages."""
    if mode == "sdedit":
        chain = sdedit
    elif mode == "demofusion":
        from .demofusion import demofusion as chain  # demofusion builds on this module
    else:
        raise ValueError(f"mode must be 'sdedit' or 'demofusion'; got {mode!r}")
    return chain(pipe, prompt, *upscale_target(image.size, scale), image=image, **kwargs)
