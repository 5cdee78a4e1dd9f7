"""Running a generation: checks first, then the plan, the stages, and a PNG that can repeat the run.

:func:`generate` and :func:`upscale_file` are what the command line calls; :func:`render` runs one request
on a pipeline that is already loaded (the web UI keeps its pipelines loaded between jobs).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..bundled.shapes import vocabulary_warning
from ..choices import BUNDLED_MODEL_NAME, SIZE_MULTIPLE
from ..io import atomic_file, format_size, parse_size, size_flag
from ..patches.stage import Savers, apply_savers
from ..patches.vae_attention import apply_vae_attention
from ..pipelines.chain import Stage, StageCallback, chain_stages, plan_stages, unet_calls
from ..pipelines.demofusion import demofusion
from ..pipelines.sdedit import sdedit
from ..pipelines.upscale import upscale_target
from ..planner import MemoryBudgetError, MemoryPlan, MemoryPlanner, available_memory
from ..runtime import freed_memory_returned, keeps_freed_memory
from ..tiled_vae import attention_flops
from ..vae_attention import QUADRATIC_HINT_TOKENS, mid_block_tokens, quadratic_attention_hint
from .loading import LINEAR_VAE_ATTENTION_MEASURED, LoadedPipeline, auto_vae_attention, is_bundled, load
from .params import RANDOM_SEED, GenerationError, GenerationParams, minimum_side_message
from .timing import ANNOUNCE_SECONDS, describe_duration, predicted_seconds

UPSCALE_PROMPT = "high quality, detailed"  # what an upscale without --prompt asks for
# With glibc keeping freed memory, the CPU's resident peak above the weights exceeds the plan's activations:
# measured on the bundled model's chains, 1.14-1.23x in stages without savers and 1.5-2.2x in stages with
# them (long-lived tensors fragment the heap: the chain to 4096 px reached 12.4 GiB at its last stage for
# a 6.8 GiB plan). A run whose plan, so inflated, exceeds its budget returns freed memory instead (its
# resident peak then follows the live tensors, at up to twice the time).
KEPT_MEMORY_FACTOR = {"no savers": 1.3, "savers": 2.0}


def note_unknown_words(params: GenerationParams, show: bool = True) -> None:
    """On the bundled model, say on stderr which words of the prompt it never saw (and what it knows)."""
    if show and is_bundled(params.model):
        warning = vocabulary_warning(params.prompt)
        if warning:
            print(f"note: {warning}", file=sys.stderr)


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


def stage_timer(
    stages: Sequence[Stage], inner: StageCallback | None = None, show: bool = True
) -> StageCallback | None:
    """``on_stage_end`` that prints each stage's size and time on stderr (when ``show``), then calls ``inner``."""
    if not show:
        return inner
    started = [time.perf_counter()]

    def report(index: int, stage: Stage, image: Image.Image) -> None:
        now = time.perf_counter()
        print(
            f"stage {index + 1}/{len(stages)} {stage.width}x{stage.height}: {now - started[0]:.1f} s",
            file=sys.stderr,
        )
        if inner is not None:
            inner(index, stage, image)
        started[0] = time.perf_counter()

    return report


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


def machine_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_host_budget(host_memory: str | None) -> None:
    """Refuse a host budget this machine does not have (a plan for another machine: ``linfusion plan``)."""
    if host_memory is None:
        return
    try:
        wanted = parse_size(host_memory)
    except ValueError as error:
        raise GenerationError(str(error)) from error
    total = machine_memory()
    if wanted > total:
        raise GenerationError(
            f"--host-memory {host_memory} is more than this machine's {format_size(total)} of memory; pass at "
            f"most --host-memory {size_flag(total)} (to plan for another machine: linfusion plan)"
        )


def check_image_fits(width: int | None, height: int | None, device: str) -> None:
    """Refuse, before anything loads, an image that alone outgrows this machine (as floats, then 8-bit).

    The memory planner refuses precisely once the model is loaded; this only spares loading a model for a
    size such as 100000x100000 that no saver can bring within this machine's memory.
    """
    if not width or not height:
        return
    needed = 3 * width * height * (4 + 1)
    available = machine_memory()
    if device != "cpu" and torch.cuda.is_available():
        available += torch.cuda.get_device_properties(
            torch.device(device if device != "auto" else "cuda")
        ).total_memory
    if needed > available:
        raise GenerationError(
            f"a {width}x{height} image alone needs {format_size(needed)} (as floats, then 8-bit), more than this "
            f"machine's {format_size(available)} of memory: choose a smaller size (linfusion plan shows what fits)"
        )


def plan_memory(
    pipe: Any,
    stages: Sequence[Stage],
    max_memory: str | None,
    guidance: float,
    quiet: bool,
    host_memory: str | None = None,
    steps: int = 1,
    mode: str = "plain",
) -> MemoryPlan:
    """The memory plan for these stages (printed), or a GenerationError that names the smallest budgets.

    ``host_memory``: what may be parked in host memory (default on a GPU: the machine's available memory).
    ``steps`` and ``mode`` count the UNet calls, for the FLOPs; a run predicted to last more than a minute
    is announced with its predicted time.
    """
    sizes = [stage.size for stage in stages]
    encodes = [stage.strength is not None for stage in stages]
    planner = MemoryPlanner(pipe)
    if host_memory is None and planner.device.type == "cuda":
        host_memory = str(available_memory(torch.device("cpu")))
    calls = [unet_calls(stage, steps, mode) for stage in stages]
    try:
        plan = planner.plan(
            sizes,
            budget=max_memory,
            guidance=guidance > 1.0,
            encodes=encodes,
            host_budget=host_memory,
            unet_calls=calls,
        )
    except (MemoryBudgetError, ValueError) as error:  # ValueError: an unreadable --max-memory
        raise GenerationError(str(error)) from error
    if not quiet:
        print(plan.describe(), file=sys.stderr)
        if returns_freed_memory(plan, planner.device):
            print(
                f"note: memory is tight ({format_size(plan.peak)} planned of {format_size(plan.budget)}): "
                "freed memory goes back to the system during this run, slower but within the plan",
                file=sys.stderr,
            )
        seconds = predicted_seconds(plan.flops, planner.device, planner.dtype)
        if seconds is not None and seconds > ANNOUNCE_SECONDS:
            print(
                f"predicted: about {describe_duration(seconds)} on this {planner.device.type} "
                f"({plan.flops:.2g} FLOPs; a prediction, not a measurement)",
                file=sys.stderr,
            )
    return plan


def choose_vae_attention(
    loaded: LoadedPipeline, params: GenerationParams, stages: Sequence[Stage], show: bool
) -> GenerationParams:
    """Settle ``--vae-attention auto`` for these stages (and apply the kernel); explicit choices stay.

    Exact while its mid-block attends over fewer than ``QUADRATIC_HINT_TOKENS`` tokens; beyond, linear when
    its fidelity on this VAE is measured (:data:`LINEAR_VAE_ATTENTION_MEASURED`), else exact with a warning
    that gives the predicted time of the attention and the flag to pass. The result records the kernel
    used, so the PNG repeats it.
    """
    vae = loaded.pipe.vae
    width, height = max((stage.size for stage in stages), key=lambda size: size[0] * size[1])
    tokens = mid_block_tokens(vae, width, height)
    if params.vae_attention != "auto":
        hint = quadratic_attention_hint(vae, [stage.size for stage in stages])
        if show and hint:
            print(hint, file=sys.stderr)
        return params
    mode = auto_vae_attention(params.model, tokens)
    if show and tokens >= QUADRATIC_HINT_TOKENS and mode == "linear":
        measured = LINEAR_VAE_ATTENTION_MEASURED[params.model or ""]
        print(f"note: VAE attention linear ({tokens:,} mid-block tokens; measured on this VAE: {measured})",
              file=sys.stderr)  # fmt: skip
    elif show and tokens >= QUADRATIC_HINT_TOKENS:
        channels = vae.config.block_out_channels[-1]
        flops = sum(  # decoded once per stage, encoded too when the stage refines an image
            attention_flops(1, mid_block_tokens(vae, *stage.size), channels, "exact")
            * (2 if stage.strength is not None else 1)
            for stage in stages
        )
        seconds = predicted_seconds(flops, loaded.device, loaded.pipe.dtype)
        when = f", predicted about {describe_duration(seconds)} here" if seconds is not None else ""
        print(
            f"warning: the VAE's mid-block softmax attention attends over {tokens:,} tokens at "
            f"{width}x{height} ({flops:.2g} FLOPs{when}); --vae-attention linear makes it linear, a close "
            "approximation whose fidelity on this VAE is not measured (measure it with "
            "linfusion.patches.vae_attention.measure_vae_attention)",
            file=sys.stderr,
        )
    loaded.patch.add(apply_vae_attention(vae, mode))
    return params.replace(vae_attention=mode)


def returns_freed_memory(plan: MemoryPlan | None, device: torch.device) -> bool:
    """Whether a run of ``plan`` returns freed memory to the system: on the CPU, when glibc keeps freed
    memory in this process and the plan has no room for what it would keep (:data:`KEPT_MEMORY_FACTOR`)."""
    if plan is None or device.type != "cpu" or not keeps_freed_memory():
        return False
    for stage in plan.stages:
        factor = KEPT_MEMORY_FACTOR["no savers" if stage.savers == Savers() else "savers"]
        if stage.weights + (stage.peak - stage.weights) * factor > plan.budget:
            return True
    return False


def memory_allocator(plan: MemoryPlan | None, device: torch.device) -> Any:
    """The allocator setting a run of ``plan`` needs, as a context manager (see :func:`returns_freed_memory`):
    freed memory goes back to the system during the run (slower: pages are faulted in again), so that the
    resident peak follows the plan; otherwise nothing changes."""
    import contextlib

    return freed_memory_returned() if returns_freed_memory(plan, device) else contextlib.nullcontext()


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
    if params.seed == RANDOM_SEED:
        raise ValueError("draw the seed first (params.with_seed()), so that the PNG can record it")
    with memory_allocator(memory_plan, loaded.device):
        return _render(loaded, params, memory_plan, image, callback_on_step_end, on_stage_end, save_stages)


def _render(
    loaded: LoadedPipeline,
    params: GenerationParams,
    memory_plan: MemoryPlan | None,
    image: Image.Image | None,
    callback_on_step_end: Callable | None,
    on_stage_end: StageCallback | None,
    save_stages: str | os.PathLike | None,
) -> Image.Image:
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
    """Generate ``params`` and write the PNG to ``out``.

    Every check of the request runs before the model loads, except the model's smallest size, checked
    once it is loaded and before any step. ``seed=-1`` draws a seed, which the PNG records. A memory plan
    for ``max_memory`` (default: the device's free memory) picks the savers each stage needs; a request
    that cannot fit is refused before any denoising starts. With ``progress``, notes, the plan and each
    stage's time go to stderr.
    """
    out_path = Path(out)
    params = params.replace(model=params.model or BUNDLED_MODEL_NAME)
    params.validate()
    params = params.with_seed()
    check_writable(out_path)
    check_host_budget(host_memory)
    check_image_fits(params.width, params.height, device)
    note_unknown_words(params, show=progress)
    loaded = load(params, device)
    try:
        params = loaded.params
        params = params.replace(
            width=params.width or loaded.native_size, height=params.height or loaded.native_size
        )
        params.validate(minimum_side=loaded.minimum_side)
        loaded.pipe.set_progress_bar_config(disable=not progress, desc="generate")
        stages = stages_for(loaded, params)
        params = choose_vae_attention(loaded, params, stages, show=progress)
        memory_plan = plan_memory(
            loaded.pipe,
            stages,
            max_memory,
            params.guidance,
            not progress,
            host_memory,
            params.steps,
            params.mode,
        )
        on_stage_end = stage_timer(stages, on_stage_end, show=progress)
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
    except FileNotFoundError as error:
        raise GenerationError(f"{source}: no such file") from error
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise GenerationError(f"cannot read the image {source}: {error}") from error
    try:
        width, height = upscale_target(image.size, scale)
    except ValueError as error:
        raise GenerationError(str(error)) from error
    params = params.replace(
        prompt=params.prompt or UPSCALE_PROMPT,
        mode=params.mode if params.mode == "demofusion" else "sdedit",
        model=params.model or BUNDLED_MODEL_NAME,
        width=width,
        height=height,
    )
    params.validate()
    params = params.with_seed()
    out_path = Path(out)
    check_writable(out_path)
    check_host_budget(host_memory)
    check_image_fits(width, height, device)
    note_unknown_words(params, show=progress and params.prompt != UPSCALE_PROMPT)
    loaded = load(params, device)
    try:
        params = loaded.params
        if min(image.size) < loaded.minimum_side:
            size = f"{image.width}x{image.height}"
            raise GenerationError(minimum_side_message(f"the image {source} ({size})", loaded.minimum_side))
        stages = plan_stages(
            width,
            height,
            max(image.size),
            sdxl=loaded.is_sdxl or params.mode == "demofusion",
            start=image.size,
        )
        if not stages:
            raise GenerationError(
                f"enlarging {image.width}x{image.height} by {scale:g} gives {width}x{height} once rounded to "
                f"multiples of {SIZE_MULTIPLE}, no larger than the image: nothing to do; use a larger --scale"
            )
        loaded.pipe.set_progress_bar_config(disable=not progress)
        params = choose_vae_attention(loaded, params, stages, show=progress)
        memory_plan = plan_memory(
            loaded.pipe,
            stages,
            max_memory,
            params.guidance,
            not progress,
            host_memory,
            params.steps,
            params.mode,
        )
        on_stage_end = stage_timer(stages, on_stage_end, show=progress)
        result = render(loaded, params, memory_plan, image, callback_on_step_end, on_stage_end, save_stages)
    finally:
        loaded.patch.remove()
    return save_png(result, params.replace(width=result.width, height=result.height), out_path)


__all__ = [
    "UPSCALE_PROMPT",
    "check_writable",
    "generate",
    "note_unknown_words",
    "memory_allocator",
    "plan_memory",
    "returns_freed_memory",
    "render",
    "save_png",
    "stage_timer",
    "stages_for",
    "upscale_file",
]
