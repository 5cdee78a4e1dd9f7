"""Running a generation: checks first, then the plan, the stages, and a PNG that can repeat the run.

:func:`generate` and :func:`upscale_file` are what the command line calls; :func:`render` runs one request
on a pipeline that is already loaded (the web UI keeps its pipelines loaded between jobs).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..choices import BUNDLED_MODEL_NAME
from ..io import atomic_file, format_size, parse_size, size_flag
from ..pipelines.chain import Stage, StageCallback, chain_stages, plan_stages
from ..pipelines.demofusion import demofusion
from ..pipelines.sdedit import sdedit
from ..pipelines.upscale import upscale_target
from ..planner import MemoryBudgetError, MemoryPlan, MemoryPlanner, Savers, apply_savers, available_memory
from ..vae_attention import quadratic_attention_hint
from .loading import LoadedPipeline, load
from .params import GenerationError, GenerationParams


def check_writable(out: Path) -> None:
    """Fail before any work if ``out`` cannot be written (its folder is created when missing)."""
    if out.suffix.lower() != ".png":
        raise GenerationError(f"--out {out}: the image is written as PNG, so the name must end in .png")
    if out.is_dir():
        raise GenerationError(f"cannot write {out}: it is a folder")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GenerationError(
            f"cannot write {out}: cannot create folder {parent} ({error.strerror})"
        ) from error
    if not os.access(parent, os.W_OK):
        raise GenerationError(f"cannot write {out}: folder {parent} is not writable")


def save_png(image: Image.Image, params: GenerationParams, out: Path) -> Path:
    """Write the PNG with its ``parameters`` chunk, atomically (no partial files); rank 0 only."""
    from PIL import PngImagePlugin

    from ..parallel.launch import is_main_process

    if not is_main_process():
        return out  # a spatial-parallel run: only rank 0 writes the file
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params.to_text())
    with atomic_file(out) as handle:
        image.save(handle, format="PNG", pnginfo=info)
    return out


def stages_for(
    loaded: LoadedPipeline, params: GenerationParams, image: Image.Image | None = None
) -> list[Stage]:
    """The stages ``params`` runs on ``loaded`` (one for plain mode; a chain from ``image`` when given)."""
    if params.width is None or params.height is None:
        raise ValueError("resolve the size first (render fills in the native size)")
    if params.mode == "plain":
        return [Stage(params.width, params.height, None)]
    return chain_stages(
        loaded.pipe, params.width, params.height, image, sdxl=loaded.is_sdxl or params.mode == "demofusion"
    )


def check_host_budget(host_memory: str | None) -> None:
    """Refuse a host budget this machine does not have (a plan for another machine: ``linfusion plan``)."""
    if host_memory is None:
        return
    try:
        wanted = parse_size(host_memory)
    except ValueError as error:
        raise GenerationError(str(error)) from error
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if wanted > total:
        raise GenerationError(
            f"--host-memory {host_memory} is more than this machine's {format_size(total)} of memory; pass at "
            f"most --host-memory {size_flag(total)} (to plan for another machine: linfusion plan)"
        )


def plan_memory(
    pipe: Any,
    stages: Sequence[Stage],
    max_memory: str | None,
    guidance: float,
    quiet: bool,
    host_memory: str | None = None,
) -> MemoryPlan:
    """The memory plan for these stages (printed), or a GenerationError that names the smallest budgets.

    ``host_memory``: what may be parked in host memory (default on a GPU: the machine's available memory).
    """
    sizes = [stage.size for stage in stages]
    encodes = [stage.strength is not None for stage in stages]
    planner = MemoryPlanner(pipe)
    if host_memory is None and planner.device.type == "cuda":
        host_memory = str(available_memory(torch.device("cpu")))
    try:
        plan = planner.plan(
            sizes, budget=max_memory, guidance=guidance > 1.0, encodes=encodes, host_budget=host_memory
        )
    except (MemoryBudgetError, ValueError) as error:  # ValueError: an unreadable --max-memory
        raise GenerationError(str(error)) from error
    if not quiet:
        print(plan.describe(), file=sys.stderr)
        hint = quadratic_attention_hint(pipe.vae, sizes)
        if hint:
            print(hint, file=sys.stderr)
    return plan


def render(
    loaded: LoadedPipeline,
    params: GenerationParams,
    memory_plan: MemoryPlan | None = None,
    image: Image.Image | None = None,
    callback_on_step_end: Callable | None = None,
    on_stage_end: StageCallback | None = None,
    save_stages: str | os.PathLike | None = None,
) -> Image.Image:
    """The image ``params`` describes, on a loaded pipeline (``image``: the input of a super-resolution)."""
    pipe = loaded.pipe
    common: dict[str, Any] = {
        "negative_prompt": params.negative_prompt or None,
        "num_inference_steps": params.steps,
        "guidance_scale": params.guidance,
        "generator": torch.Generator(loaded.device).manual_seed(params.seed),
        "callback_on_step_end": callback_on_step_end,
    }
    if params.mode == "plain":
        savers = memory_plan.stages[0].savers if memory_plan is not None else Savers()
        with apply_savers(pipe, savers):
            result = pipe(params.prompt, width=params.width, height=params.height, **common).images[0]
        if on_stage_end is not None:
            on_stage_end(0, Stage(params.width, params.height, None), result)
        return result
    chain = sdedit if params.mode == "sdedit" else demofusion
    return chain(
        pipe,
        params.prompt,
        params.width,
        params.height,
        image=image,
        memory_plan=memory_plan,
        save_stages=save_stages,
        on_stage_end=on_stage_end,
        **common,
    )


def generate(
    params: GenerationParams,
    out: str | os.PathLike,
    device: str = "auto",
    callback_on_step_end: Callable | None = None,
    progress: bool = True,
    save_stages: str | os.PathLike | None = None,
    max_memory: str | None = None,
    on_stage_end: StageCallback | None = None,
    host_memory: str | None = None,
) -> Path:
    """Generate ``params`` and write the PNG to ``out``; every check runs before the model loads.

    A memory plan for ``max_memory`` (default: the device's free memory) picks the savers each stage
    needs; a request that cannot fit is refused before any denoising starts.
    """
    out_path = Path(out)
    params = params.replace(model=params.model or BUNDLED_MODEL_NAME)
    params.validate()
    check_writable(out_path)
    check_host_budget(host_memory)
    loaded = load(params, device)
    try:
        params = loaded.params
        params = params.replace(
            width=params.width or loaded.native_size, height=params.height or loaded.native_size
        )
        loaded.pipe.set_progress_bar_config(disable=not progress, desc="generate")
        memory_plan = plan_memory(
            loaded.pipe, stages_for(loaded, params), max_memory, params.guidance, not progress, host_memory
        )
        image = render(loaded, params, memory_plan, None, callback_on_step_end, on_stage_end, save_stages)
    finally:
        loaded.patch.remove()
    return save_png(image, params, out_path)


def upscale_file(
    source: str | os.PathLike,
    scale: float,
    params: GenerationParams,
    out: str | os.PathLike,
    device: str = "auto",
    progress: bool = True,
    save_stages: str | os.PathLike | None = None,
    max_memory: str | None = None,
    callback_on_step_end: Callable | None = None,
    on_stage_end: StageCallback | None = None,
    host_memory: str | None = None,
) -> Path:
    """Enlarge the image at ``source`` by ``scale`` with SDEdit (or, with ``params.mode`` "demofusion",
    DemoFusion) stages guided by ``params.prompt``."""
    try:
        with Image.open(source) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError) as error:
        raise GenerationError(f"cannot read the image {source}: {error}") from error
    try:
        width, height = upscale_target(image.size, scale)
    except ValueError as error:
        raise GenerationError(str(error)) from error
    params = params.replace(
        prompt=params.prompt or "high quality, detailed",
        mode=params.mode if params.mode == "demofusion" else "sdedit",
        model=params.model or BUNDLED_MODEL_NAME,
        width=width,
        height=height,
    )
    params.validate()
    out_path = Path(out)
    check_writable(out_path)
    check_host_budget(host_memory)
    loaded = load(params, device)
    try:
        params = loaded.params
        loaded.pipe.set_progress_bar_config(disable=not progress)
        stages = plan_stages(
            width,
            height,
            max(image.size),
            sdxl=loaded.is_sdxl or params.mode == "demofusion",
            start=image.size,
        )
        memory_plan = plan_memory(loaded.pipe, stages, max_memory, params.guidance, not progress, host_memory)
        result = render(loaded, params, memory_plan, image, callback_on_step_end, on_stage_end, save_stages)
    finally:
        loaded.patch.remove()
    return save_png(result, params.replace(width=result.width, height=result.height), out_path)


__all__ = ["check_writable", "generate", "plan_memory", "render", "save_png", "stages_for", "upscale_file"]
