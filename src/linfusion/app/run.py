"""The command line's runs: checks first, then load, :func:`~linfusion.app.prepare.prepare`, and
:func:`~linfusion.app.execute.execute` to a PNG that can repeat the run.

:func:`generate` and :func:`upscale_file` are what ``linfusion generate`` / ``upscale`` (and the Python API)
call; they print the plan and notes on stderr. The web UI runs the same prepare and execute on its own
loaded pipelines (:mod:`linfusion.ui`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from ..bundled.shapes import vocabulary_warning
from ..errors import excerpt
from ..images import ImageError, open_image
from ..io import format_size
from ..pipelines.chain import Stage, StageCallback
from ..planner import MAX_PLANNED_PIXELS
from .checks import check_not_source, preflight
from .execute import execute, returns_freed_memory
from .loading import LoadedPipeline, is_bundled, load
from .params import GenerationError, GenerationParams, recorded_prompts
from .prepare import UPSCALE_PROMPT, Budgets, RunPlan, prepare, upscale_params
from .timing import ANNOUNCE_SECONDS, describe_duration, predicted_seconds


def note_unknown_words(params: GenerationParams, show: bool = True) -> None:
    """On the bundled model, say on stderr which words of the prompt it never saw (and what it knows)."""
    if show and is_bundled(params.model):
        warning = vocabulary_warning(params.prompt)
        if warning:
            print(f"note: {warning}", file=sys.stderr)


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


def announce(run: RunPlan, loaded: LoadedPipeline) -> None:
    """The notes, the memory plan and, for a long run, its predicted time, on stderr."""
    for note in run.notes:
        print(note, file=sys.stderr)
    plan = run.memory
    print(plan.describe(), file=sys.stderr)
    if returns_freed_memory(plan, loaded.device):
        print(
            f"note: memory is tight ({format_size(plan.peak)} planned of {format_size(plan.budget)}): "
            "freed memory goes back to the system during this run, slower but within the plan",
            file=sys.stderr,
        )
    seconds = predicted_seconds(plan.flops, loaded.device, loaded.pipe.dtype)
    if seconds is not None and seconds > ANNOUNCE_SECONDS:
        print(
            f"predicted: about {describe_duration(seconds)} on this {loaded.device.type} "
            f"({plan.flops:.2g} FLOPs; a prediction, not a measurement)",
            file=sys.stderr,
        )


def run_loaded(
    params: GenerationParams,
    device: str,
    budgets: Budgets,
    out: Path,
    progress: bool,
    callbacks: tuple[Callable | None, StageCallback | None],
    source: Image.Image | None = None,
    save_stages: str | os.PathLike | None = None,
) -> Path:
    """Load, prepare, execute: the part :func:`generate` and :func:`upscale_file` share."""
    loaded = load(params, device)
    try:
        loaded.pipe.set_progress_bar_config(
            disable=not progress, desc="generate"
        )  # chains label their stages
        run = prepare(
            loaded.params, loaded.pipe, budgets, source=source, out=out, save_stages=save_stages,
            patch=loaded.patch,
        )  # fmt: skip
        if progress:
            announce(run, loaded)
        on_step_end, on_stage_end = callbacks
        result = execute(run, loaded, on_step_end, stage_timer(run.stages, on_stage_end, show=progress))
    finally:
        loaded.patch.remove()
    assert result.path is not None
    return result.path


def stages_folder(save_stages: str | os.PathLike | None) -> Path | None:
    return Path(save_stages) if save_stages is not None else None


def generate(
    params: GenerationParams,
    out: str | os.PathLike,
    device: str = "auto",
    callback_on_step_end: Callable | None = None,
    progress: bool = True,
    save_stages: str | os.PathLike | None = None,
    max_memory: int | None = None,
    on_stage_end: StageCallback | None = None,
    host_memory: int | None = None,
) -> Path:
    """Generate ``params`` and write the PNG to ``out``.

    Every check of the request runs before the model loads, except the model's smallest size, checked
    once it is loaded and before any step. ``seed=-1`` draws a seed, which the PNG records. A memory plan
    for ``max_memory`` / ``host_memory`` (bytes; defaults: :mod:`linfusion.app.prepare`) picks the savers
    each stage needs; a request that cannot fit is refused before any denoising starts. With ``progress``,
    notes, the plan and each stage's time go to stderr.
    """
    out_path = Path(out)
    budgets = Budgets(max_memory, host_memory)
    params = preflight(params, out_path, device, budgets, stages_folder(save_stages))
    note_unknown_words(params, show=progress)
    return run_loaded(
        params, device, budgets, out_path, progress, (callback_on_step_end, on_stage_end), None, save_stages
    )


def upscale_file(
    source: str | os.PathLike,
    scale: float,
    params: GenerationParams,
    out: str | os.PathLike,
    device: str = "auto",
    progress: bool = True,
    save_stages: str | os.PathLike | None = None,
    max_memory: int | None = None,
    callback_on_step_end: Callable | None = None,
    on_stage_end: StageCallback | None = None,
    host_memory: int | None = None,
) -> Path:
    """Enlarge the image at ``source`` by ``scale`` with SDEdit (or, with ``params.mode`` "demofusion",
    DemoFusion) stages guided by ``params.prompt``; without one, by the prompt the PNG records (a model
    asked for new detail with words it was not trained on can lose what the image shows), else
    ``UPSCALE_PROMPT``."""
    out_path = Path(out)
    check_not_source(out_path, Path(source))
    recorded = None if params.prompt else recorded_prompts(source)
    if recorded is not None:
        params = params.replace(prompt=recorded[0], negative_prompt=params.negative_prompt or recorded[1])
        if progress:
            name = Path(source).name
            print(
                f"note: prompt {excerpt(recorded[0])}, as {name} records it (--prompt to change it)",
                file=sys.stderr,
            )
    try:  # an image beyond the planner's reach could not be enlarged anyway
        image = open_image(source, max_pixels=MAX_PLANNED_PIXELS)
    except ImageError as error:
        raise GenerationError(str(error)) from error
    budgets = Budgets(max_memory, host_memory)
    params = preflight(
        upscale_params(params, image.size, scale), out_path, device, budgets, stages_folder(save_stages)
    )
    note_unknown_words(params, show=progress and params.prompt != UPSCALE_PROMPT)
    return run_loaded(
        params, device, budgets, out_path, progress, (callback_on_step_end, on_stage_end), image, save_stages
    )


__all__ = [
    "generate",
    "note_unknown_words",
    "stage_timer",
    "upscale_file",
]
