"""What the web page asks of the library, behind one object: :class:`Backend`.

The page (:mod:`linfusion.ui.page`) builds a :class:`~linfusion.ui.requests.TextToImageRequest` or
:class:`~linfusion.ui.requests.UpscaleRequest`, asks :class:`Backend` for the memory plan, and submits
:meth:`Backend.text_to_image` / :meth:`Backend.upscale` to the job queue. Each job is the command line's own
run path: :func:`linfusion.app.prepare.prepare_steps` on the model's planning copy, then
:func:`linfusion.app.execute.execute` on the loaded pipeline. The jobs are this module's; the other jobs
have their own modules: :mod:`.models` (loading, planning copies, a job's patches), :mod:`.requests`
(the page's fields, checked), :mod:`.planning` (the plan box), :mod:`.outputs` (files in and out).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..app.execute import execute
from ..app.params import GenerationParams
from ..choices import SCHEDULERS
from ..errors import UserError
from ..io import GIB, format_size
from ..pipelines.chain import Stage, denoising_steps
from .jobs import Job, StageWork
from .models import ModelShelf, ModelSlot
from .outputs import OutputFolder, Result, open_upload, read_parameters, upload_header
from .planning import PlanView, plan_progress
from .preview import LatentPreview
from .requests import (
    Request,
    TextToImageRequest,
    UpscaleRequest,
    budget_bytes,
    request_params,
    upscale_request_params,
)

PREVIEW_SIDE = 1024  # stage previews are shrunk to this long side (the PNG on disk keeps every pixel)
PREVIEW_EVERY = 3.0  # seconds between two live previews: rare enough to leave the status line's pace alone


class Backend:
    """The models, the plans, the jobs' work and the outputs folder of one ``linfusion ui``."""

    def __init__(self, models: Sequence[str], outputs: str | os.PathLike, device: str = "auto") -> None:
        self.models = ModelShelf(models, device)
        self.files = OutputFolder(outputs)
        self.model_names = self.models.model_names
        self.device, self.dtype, self.outputs = self.models.device, self.models.dtype, self.files.folder

    def load_all(self) -> None:
        self.models.load_all()

    def slot(self, name: str) -> ModelSlot:
        return self.models.slot(name)

    def native_size(self, name: str) -> int:
        """The side in pixels of the images model ``name`` was trained at."""
        return self.models.slot(name).native

    def params_for(self, request: Request) -> GenerationParams:
        """The request, checked (:func:`~linfusion.ui.requests.request_params`); :class:`UserError` if not."""
        return request_params(request, self.models.slot(request.model))

    def recent(self, limit: int = 48) -> list[Result]:
        return self.files.recent(limit)

    def read_parameters(self, path: str | os.PathLike) -> tuple[dict[str, Any], str]:
        """The page's field values recorded in a dropped PNG, and a note for the page."""
        return read_parameters(path, self.model_names)

    # ------------------------------------------------------------------ memory plans
    def plan(self, request: Request) -> PlanView:
        """The memory plan of a request, without running it; a bad request gives its message as the view."""
        *_, view = self.plan_progress(request)
        assert isinstance(view, PlanView)
        return view

    def plan_progress(self, request: Request) -> Iterator[str | PlanView]:
        """Progress lines while the stages are traced, then the :class:`PlanView` (see :mod:`.planning`)."""
        try:
            if not (request.prompt or "").strip():  # the plan does not depend on the words
                request = dataclasses.replace(request, prompt="plan")
            if isinstance(request, UpscaleRequest):
                with upload_header(request.image_path) as header:
                    if header is None:
                        yield PlanView(False, "Upload an image to see the plan.")
                        return
                    yield from self._plan(request, header)
            else:
                yield from self._plan(request, None)
        except UserError as error:
            yield PlanView(False, f"Cannot plan: {error}")

    def _plan(self, request: Request, source: Image.Image | None) -> Iterator[str | PlanView]:
        params = self.params_for(request)
        if isinstance(request, UpscaleRequest):
            assert source is not None
            params = upscale_request_params(request, params, source.size)
        budget = budget_bytes(request.budget)
        device_memory = self.models.device_memory()
        if budget is not None and budget > device_memory:
            raise UserError(
                f"memory budget {format_size(budget)} is more than this {self.device.type} device has "
                f"({format_size(device_memory)}): enter at most {device_memory * 10 // GIB / 10:g}GB, or leave it empty "
                "for the free memory"
            )
        slot = self.models.slot(request.model)
        planning = self.models.planning(slot, bool(request.linfusion), request.vae_attention)
        yield from plan_progress(planning, params, budget, source, device_memory)

    # ------------------------------------------------------------------ jobs (run on the device worker)
    def text_to_image(self, request: TextToImageRequest, job: Job) -> Result:
        """The Generate tab's job: plan, run, save a new PNG."""
        return self._run(request, None, job, time.monotonic())

    def upscale(self, request: UpscaleRequest, job: Job) -> Result:
        """The Upscale tab's job: enlarge the uploaded image, save a new PNG that names its source and scale."""
        started = time.monotonic()
        source = open_upload(request.image_path)
        name = " ".join(Path(request.image_path or "").name.replace(",", " ").split())  # one pair
        recorded = {"Upscaled from": name, "Upscale factor": f"{float(request.scale):g}"}
        return self._run(request, source, job, started, recorded)

    def _run(
        self,
        request: Request,
        source: Image.Image | None,
        job: Job,
        started: float,
        extra: dict[str, str] | None = None,
    ) -> Result:
        """Prepare (refused before any step when it cannot fit), execute, save."""
        view = None
        for item in self._plan(request, source):
            job.check_cancelled()
            if isinstance(item, str):
                job.set_note(item)
            else:
                view = item
        assert view is not None and view.run is not None, "the planner yields a plan last"
        if not view.fits:
            raise UserError(view.text.splitlines()[0])
        job.set_note("")
        run = view.run
        steps = [denoising_steps(stage, run.params.steps) for stage in run.stages]
        job.plan([StageWork(stage.width, stage.height, count) for stage, count in zip(run.stages, steps)])
        slot = self.models.slot(request.model)
        preview = self.models.latent_preview(slot)
        with self.models.prepared(slot, run.params) as loaded:
            result = execute(run, loaded, _step_callback(job, preview), _stage_callback(job))
        job.check_cancelled()
        return self.files.save(result.image, result.params, started, extra)


def _step_callback(job: Job, preview: LatentPreview | None = None) -> Callable[..., dict[str, Any]]:
    """diffusers' ``callback_on_step_end``: report the step (and a live preview, at most every
    :data:`PREVIEW_EVERY` seconds), stop here when the job was cancelled."""
    shown = [float("-inf")]

    def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        latents = tensors.get("latents")
        if preview is not None and latents is not None and time.monotonic() - shown[0] >= PREVIEW_EVERY:
            job.show_preview(preview.image(latents))
            shown[0] = time.monotonic()
        job.step_done(job.stage, index + 1, getattr(pipe, "num_timesteps", None))
        return tensors

    return on_step_end


def _stage_callback(job: Job) -> Callable[[int, Stage, Image.Image], None]:
    def on_stage_end(index: int, stage: Stage, image: Image.Image) -> None:
        preview = image.copy()
        preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        job.stage_done(index, preview, f"{index + 1}: {stage.width}x{stage.height}")

    return on_stage_end


__all__ = ["SCHEDULERS", "Backend"]  # SCHEDULERS: the Sampler choices of the page
