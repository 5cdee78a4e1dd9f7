"""Executing a prepared run: the stages of a :class:`~linfusion.app.prepare.RunPlan` on a loaded pipeline.

The caller loads (the command line loads per run, the web UI keeps its pipelines) and prepares; :func:`execute`
renders with the plan's savers under the allocator setting the plan needs, and writes the PNG when the plan
names one. Nothing here decides anything about the request.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..io import atomic_file
from ..patches.stage import Savers, apply_savers
from ..pipelines.chain import StageCallback, text_to_image
from ..pipelines.demofusion import demofusion
from ..pipelines.sdedit import sdedit
from ..planner import MemoryPlan
from ..runtime import freed_memory_returned, keeps_freed_memory
from .loading import LoadedPipeline
from .params import RANDOM_SEED, GenerationError, GenerationParams
from .prepare import RunPlan

# A CPU run's resident peak above the weights over its plan's activations while glibc keeps freed memory,
# without and with savers: measured in docs/high-resolution.md, "Tight memory on the CPU".
KEPT_MEMORY_FACTOR = {"no savers": 1.3, "savers": 2.0}


@dataclass(frozen=True)
class RunResult:
    """The image of a run, the parameters it records (its final size), and the PNG written (if any)."""

    image: Image.Image
    params: GenerationParams
    path: Path | None


def save_png(
    image: Image.Image, params: GenerationParams, out: Path, extra: Mapping[str, str] | None = None
) -> Path:
    """Write the PNG with its ``parameters`` chunk (``extra`` pairs appended, see
    :meth:`GenerationParams.to_text`), atomically (no partial files); rank 0 only."""
    from PIL import PngImagePlugin

    from ..parallel.launch import is_main_process

    if not is_main_process():
        return out  # a spatial-parallel run: only rank 0 writes the file
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params.to_text(extra))
    with atomic_file(out) as handle:
        image.save(handle, format="PNG", pnginfo=info)
    return out


def save_png_or_keep(image: Image.Image, params: GenerationParams, out: Path) -> Path:
    """:func:`save_png`; when that fails (a full disk, a folder gone), the image is written to the system's
    temporary folder instead and the error names that copy, so a long render is never lost."""
    try:
        return save_png(image, params, out)
    except OSError as error:
        why = error.strerror or str(error)
        kept = None
        try:
            descriptor, kept = tempfile.mkstemp(prefix=f"linfusion-{out.stem}-", suffix=".png")
            os.close(descriptor)
            save_png(image, params, Path(kept))
        except OSError as again:
            if kept is not None:
                Path(kept).unlink(missing_ok=True)  # no empty file left where the copy failed
            raise GenerationError(
                f"cannot write {out} ({why}), nor a copy in {tempfile.gettempdir()} "
                f"({again.strerror or again}): the image is lost; free some space and run again"
            ) from error
        raise GenerationError(
            f"cannot write {out} ({why}); the image is kept at {kept} (move it where you want it)"
        ) from error


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
    return freed_memory_returned() if returns_freed_memory(plan, device) else contextlib.nullcontext()


def render(
    loaded: LoadedPipeline,
    run: RunPlan,
    callback_on_step_end: Callable | None = None,
    on_stage_end: StageCallback | None = None,
) -> Image.Image:
    """The image ``run`` describes, on a pipeline loaded (and patched) as its parameters ask."""
    params = run.params
    if params.seed == RANDOM_SEED:
        raise ValueError("draw the seed first (prepare does), so that the PNG can record it")
    pipe = loaded.pipe
    common: dict[str, Any] = {
        "negative_prompt": params.negative_prompt or None,
        "num_inference_steps": params.steps,
        "guidance_scale": params.guidance,
        "generator": torch.Generator(loaded.device).manual_seed(params.seed),
        "callback_on_step_end": callback_on_step_end,
    }
    with memory_allocator(run.memory, loaded.device):
        if params.mode == "plain":
            with apply_savers(pipe, run.memory.stages[0].savers):
                result = text_to_image(pipe, params.width, params.height, prompt=params.prompt, **common)
            if on_stage_end is not None:
                on_stage_end(0, run.stages[0], result)
            return result
        chain = sdedit if params.mode == "sdedit" else demofusion
        return chain(
            pipe,
            params.prompt,
            params.width,
            params.height,
            image=run.source,
            stage_plan=run.stages,
            memory_plan=run.memory,
            save_stages=run.save_stages,
            on_stage_end=on_stage_end,
            **common,
        )


def execute(
    run: RunPlan,
    loaded: LoadedPipeline,
    callback_on_step_end: Callable | None = None,
    on_stage_end: StageCallback | None = None,
) -> RunResult:
    """Run ``run`` on ``loaded``; writes the PNG when ``run.out`` names one (the parameters at the final size)."""
    image = render(loaded, run, callback_on_step_end, on_stage_end)
    params = run.params.replace(width=image.width, height=image.height)
    path = save_png_or_keep(image, params, run.out) if run.out is not None else None
    return RunResult(image, params, path)


__all__ = [
    "KEPT_MEMORY_FACTOR",
    "RunResult",
    "execute",
    "memory_allocator",
    "render",
    "returns_freed_memory",
    "save_png",
    "save_png_or_keep",
]
