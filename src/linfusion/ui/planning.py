"""The memory plan box: a request prepared on the model's meta copy, stage by stage, as the page words it.

Planning is :func:`linfusion.app.prepare.prepare_steps`, the command line's own, on the planning copy of
the model (:meth:`~linfusion.ui.models.ModelShelf.planning`); this module only turns its progress and its
:class:`~linfusion.app.prepare.RunPlan` into the page's lines.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from ..app.params import GenerationParams
from ..app.prepare import Budgets, RunPlan, StageProgress, prepare_steps
from ..io import format_size, size_flag
from ..pipelines.chain import Stage, denoising_steps
from ..planner import StagePlan
from .models import PlanningModel


@dataclass
class PlanView:
    """The memory plan as the page shows it; ``smallest_budget`` (bytes) is set when it does not fit."""

    fits: bool
    text: str
    smallest_budget: int | None = None
    run: RunPlan | None = None


def stage_line(index: int, stage: Stage, planned: StagePlan, steps: int) -> str:
    """One stage of the plan box: its size and steps, its peak (and what it parks off the device), savers."""
    parked = f", host {format_size(planned.host_peak)}" if planned.host_peak else ""
    return (
        f"stage {index} {stage.width}x{stage.height}, {steps} steps: peak ~{format_size(planned.peak)}"
        f"{parked}; savers: {', '.join(planned.savers.names())}"
    )


def plan_view(run: RunPlan, budget_given: bool, device_memory: int | None = None) -> PlanView:
    """The plan box of ``run``: fits (its peak) or not (the smallest budget to enter), then one line a stage.

    ``device_memory`` (bytes): all the memory of the device; a smallest budget above it is not advised.
    """
    plan = run.memory
    budget_words = format_size(plan.budget)
    if not budget_given:
        budget_words += f" (free memory on {plan.device.type})"
    lines = [
        stage_line(index, stage, planned, denoising_steps(stage, run.params.steps))
        for index, (stage, planned) in enumerate(zip(run.stages, plan.stages), start=1)
    ]
    lines += [note.replace("--vae-attention linear", 'VAE attention "linear"') for note in run.notes]
    if plan.fits:
        head = f"Fits: estimated peak {format_size(plan.peak)} within the budget of {budget_words}."
        return PlanView(True, "\n".join([head, *lines]), run=run)
    head = (
        f"Does not fit the budget of {budget_words}: even with every saver on, the estimated peak is "
        f"{format_size(plan.peak)}. "
    )
    if device_memory is not None and plan.peak > device_memory:
        head += (
            f"That is more than all the memory of this {plan.device.type} device ({format_size(device_memory)}): "
            "choose a smaller size."
        )
    else:
        head += (
            f"The smallest budget that fits is about {format_size(plan.peak)}: "
            f"enter {size_flag(plan.peak)} as the memory budget, or choose a smaller size."
        )
    return PlanView(False, "\n".join([head, *lines]), smallest_budget=plan.peak, run=run)


def plan_progress(
    model: PlanningModel,
    params: GenerationParams,
    budget: int | None,
    source: Image.Image | None = None,
    device_memory: int | None = None,
) -> Iterator[str | PlanView]:
    """Progress lines while the stages are traced (seconds each at first), then the :class:`PlanView`.

    A caller that stops iterating stops the tracing between two stages; one trace at a time per model.
    """
    steps = prepare_steps(
        params, model.view, Budgets(budget), planner=model.planner, source=source, refuse=False
    )
    while True:
        with model.lock:
            item = next(steps, None)
        if item is None:
            return
        if isinstance(item, StageProgress):
            stage = item.stage
            yield f"Planning the memory: stage {item.index + 1} of {item.count} ({stage.width}x{stage.height})..."
        else:
            yield plan_view(item, budget is not None, device_memory)


__all__ = ["PlanView", "plan_progress", "plan_view", "stage_line"]
