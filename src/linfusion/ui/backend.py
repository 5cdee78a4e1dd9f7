"""Everything the web UI asks of the rest of linfusion, in one module.

The page (:mod:`linfusion.ui.page`) never imports the library directly: it builds a
:class:`TextToImageRequest` or :class:`UpscaleRequest`, asks :class:`Backend` for the memory plan, and
submits :meth:`Backend.text_to_image` / :meth:`Backend.upscale` to the job queue. So when the library's
layout changes, only the imports and calls here move.

Models are loaded once, at start, and kept. A job applies LinFusion, the VAE attention kernel and the
sampler it asks for to the loaded pipeline as one :class:`~linfusion.patches.Patch`, runs the request with
:func:`linfusion.app.run.render` (the command line's own dispatch), and removes the patch. Memory plans for
the page are traced on a meta-device copy of the model in the state the request asks for, so a plan can be
shown while a job runs without touching the pipeline that job is using.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..app.loading import (
    LoadedPipeline,
    attach_linfusion,
    load_pipeline,
    resolve_device,
    resolve_dtype,
    resolve_model,
    use_scheduler,
)
from ..app.params import GenerationError, GenerationParams
from ..app.run import render, save_png, stages_for
from ..choices import BUNDLED_MODEL_NAME, CHAIN_MODES, GENERATION_MODES, SCHEDULERS, VAE_ATTENTION_MODES
from ..io import format_size, parse_size, size_flag
from ..model import LinFusion
from ..patches.base import Patch
from ..patches.vae_attention import apply_vae_attention
from ..pipelines.chain import Stage, denoising_steps, native_long_side
from ..pipelines.upscale import upscale_target
from ..planner import MemoryPlan, MemoryPlanner, StagePlan
from ..vae_attention import quadratic_attention_hint
from .jobs import Job, StageWork, UserError

logger = logging.getLogger(__name__)

MAX_SIDE = 32768  # pixels per side the page accepts (the presets stop at 16K)
MAX_STEPS = 500  # a sampler cannot take as many steps as the model's training schedule (1000)
MAX_UPLOAD_PIXELS = 64 * 2**20  # an upload to enlarge: up to 64 megapixels
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
PREVIEW_SIDE = 1024  # stage previews are shrunk to this long side (the PNG on disk keeps every pixel)
MODE_LABELS = {"plain": "plain", "sdedit": "SDEdit chain", "demofusion": "DemoFusion"}
UPSCALE_MODES = CHAIN_MODES


@dataclass(kw_only=True)
class JobSettings:
    """The settings both tabs send. ``seed`` -1 draws a random seed; ``budget`` "" means free memory."""

    negative_prompt: str = ""
    mode: str = "plain"
    steps: int = 25
    guidance: float = 7.5
    seed: int = -1
    linfusion: bool = True
    vae_attention: str = "exact"
    budget: str = ""
    model: str = BUNDLED_MODEL_NAME
    sampler: str = ""  # "" keeps the model's own scheduler


@dataclass
class TextToImageRequest(JobSettings):
    """What the Generate tab sends: a prompt and the size of the image."""

    prompt: str
    _: KW_ONLY
    width: int | None = None
    height: int | None = None


@dataclass
class UpscaleRequest(JobSettings):
    """What the Upscale tab sends: the uploaded file and how to enlarge it."""

    image_path: str | None
    _: KW_ONLY
    scale: float = 2.0
    prompt: str = ""  # what the image shows (guides the new detail)
    mode: str = "sdedit"


Request = TextToImageRequest | UpscaleRequest


@dataclass
class PlanView:
    """The memory plan as the page shows it; ``smallest_budget`` (bytes) is set when it does not fit."""

    fits: bool
    text: str
    smallest_budget: int | None = None
    plan: MemoryPlan | None = None


@dataclass
class Result:
    path: Path
    parameters: str
    seed: int
    width: int
    height: int
    seconds: float


@dataclass
class PlanningModel:
    """A planner for one model in one state (LinFusion on or off, a VAE kernel), on meta copies."""

    planner: MemoryPlanner
    vae: Any  # the meta VAE the planner reads the attention kernel from
    lock: threading.Lock = field(default_factory=threading.Lock)  # one trace at a time on the meta models


@dataclass
class ModelSlot:
    """One model named at start: its pipeline (loaded once), its LinFusion (or why there is none)."""

    name: str
    pipe: Any
    linfusion: LinFusion | None
    linfusion_error: str | None
    scheduler: Any  # the model's own scheduler, put back after every job
    scheduler_name: str  # as the Sampler choices name it
    planning: dict[tuple[bool, str], PlanningModel] = field(default_factory=dict)

    @property
    def native(self) -> int:
        """The side in pixels of the images the model was trained at."""
        return native_long_side(self.pipe)


def open_device(name: str) -> torch.device:
    """The ``--device`` to run on (``auto``: CUDA when present); :class:`UserError` when there is none."""
    try:
        device = resolve_device(name)
    except GenerationError as error:
        raise UserError(f"--device {name}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA device (use cpu)")
    return device


class Backend:
    """The loaded models, the plans, the jobs' work and the outputs folder of one ``linfusion ui``."""

    def __init__(self, models: Sequence[str], outputs: str | os.PathLike, device: str = "auto") -> None:
        if not models:
            raise UserError("name at least one model")
        self.model_names = list(dict.fromkeys(models))
        self.outputs = Path(outputs).resolve()
        self.device = open_device(device)
        self.dtype = resolve_dtype("auto", self.device)
        self._slots: dict[str, ModelSlot] = {}
        self._load_lock = threading.Lock()
        self._planning_lock = threading.Lock()  # guards the planners of every slot
        self._written: list[Result] = []

    # ------------------------------------------------------------------ models
    def load_all(self) -> None:
        """Load every model named at start (so a bad name fails at start, not on the first job)."""
        for name in self.model_names:
            self.slot(name)

    def slot(self, name: str) -> ModelSlot:
        """The model ``name`` (one named at start), loaded on first use."""
        if name not in self.model_names:
            raise UserError(
                f"model {name!r} is not one this server was started with ({', '.join(self.model_names)})"
            )
        with self._load_lock:
            if name not in self._slots:
                self._slots[name] = self._load(name)
            return self._slots[name]

    def _load(self, name: str) -> ModelSlot:
        source = resolve_model(name)
        try:
            pipe = load_pipeline(source, self.device, self.dtype)
        except GenerationError as error:
            raise UserError(str(error)) from error
        pipe.set_progress_bar_config(disable=True)
        linfusion, reason = None, None
        try:
            linfusion = attach_linfusion(pipe, source, "auto")
        except (GenerationError, LookupError, OSError, ValueError) as error:
            reason = str(error)
            logger.warning("model %s: LinFusion is not available (%s)", name, reason)
        if linfusion is not None:
            linfusion.unmount()  # each job that asks for LinFusion mounts it for its run
        return ModelSlot(name, pipe, linfusion, reason, pipe.scheduler, use_scheduler(pipe, None))

    def native_size(self, name: str) -> int:
        """The side in pixels of the images model ``name`` was trained at."""
        return self.slot(name).native

    # ------------------------------------------------------------------ checks
    def params_for(self, request: Request) -> GenerationParams:
        """The request as the PNG will record it, checked; raises :class:`UserError` with what to change.

        An upscale's size is left out here: it follows from the upload (:meth:`resolve`).
        """
        slot = self.slot(request.model)
        if request.sampler and request.sampler not in SCHEDULERS:
            raise UserError(f"unknown sampler {request.sampler!r}; choose one of {', '.join(SCHEDULERS)}")
        if request.vae_attention not in VAE_ATTENTION_MODES:
            raise UserError(f"unknown VAE attention {request.vae_attention!r}")
        if request.linfusion and slot.linfusion is None:
            raise UserError(
                f"LinFusion is not available for model {slot.name}: {slot.linfusion_error} "
                "Untick LinFusion to run the model's own attention."
            )
        upscaling = isinstance(request, UpscaleRequest)
        if upscaling and request.mode not in UPSCALE_MODES:
            raise UserError(f"unknown upscale mode {request.mode!r}; choose {' or '.join(UPSCALE_MODES)}")
        if not upscaling and not (request.prompt or "").strip():
            raise UserError("the prompt is empty: say what to draw, e.g. a red circle on a gray background")
        guidance = float(request.guidance if request.guidance is not None else 7.5)
        if not math.isfinite(guidance) or not 0 <= guidance <= 100:
            raise UserError(f"guidance {request.guidance}: use a number from 0 to 100 (e.g. 7.5)")
        params = GenerationParams(
            prompt=(request.prompt or "high quality, detailed") if upscaling else request.prompt,
            negative_prompt=request.negative_prompt or "",
            width=None if upscaling else _whole(request.width, "width"),
            height=None if upscaling else _whole(request.height, "height"),
            steps=_whole(request.steps, "steps") or 0,
            guidance=guidance,
            seed=_whole(request.seed, "seed") if request.seed is not None else -1,
            scheduler=request.sampler or slot.scheduler_name,
            model=slot.name,
            linfusion="auto" if request.linfusion else "none",
            mode=request.mode,
            vae_attention=request.vae_attention,
        )
        try:
            params.validate()
        except GenerationError as error:
            raise UserError(str(error).replace("--steps", "steps")) from error
        for name in ("width", "height"):
            value = getattr(params, name)
            if value is None and not upscaling:
                raise UserError(f"enter a {name} (a multiple of 8, e.g. {slot.native})")
            if value is not None and value > MAX_SIDE:
                raise UserError(f"{name} {value} is larger than this page accepts ({MAX_SIDE} px)")
        if params.steps > MAX_STEPS:
            raise UserError(f"steps {params.steps}: at most {MAX_STEPS}")
        if params.seed < -1 or params.seed >= 2**63:
            raise UserError(f"seed {params.seed}: use -1 (random) or a number from 0 to 2^63 - 1")
        return params

    def resolve(
        self, request: Request, image: Image.Image | None = None
    ) -> tuple[GenerationParams, list[Stage]]:
        """The checked parameters (an upscale's output size filled in) and the stages the request runs.

        ``image``: the upload of an :class:`UpscaleRequest` (only its size is read).
        """
        params = self.params_for(request)
        if isinstance(request, UpscaleRequest):
            if image is None:
                raise UserError("upload an image to enlarge")
            params = params.replace(**dict(zip(("width", "height"), self._upscale_size(request, image.size))))
        slot = self.slot(request.model)
        return params, stages_for(self._loaded(slot, params), params, image)

    def _upscale_size(self, request: UpscaleRequest, size: tuple[int, int]) -> tuple[int, int]:
        scale = float(request.scale or 0)
        if not math.isfinite(scale) or scale > MAX_SIDE:
            raise UserError(f"scale {request.scale}: enlarge by a number such as 2 or 4")
        try:
            target = upscale_target(size, scale)
        except ValueError as error:
            raise UserError(f"scale {request.scale}: enlarge by more than 1 (e.g. 2)") from error
        if max(target) > MAX_SIDE:
            raise UserError(
                f"{size[0]}x{size[1]} x {request.scale} is larger than this page accepts ({MAX_SIDE} px)"
            )
        return target

    def _loaded(
        self, slot: ModelSlot, params: GenerationParams, patch: Patch | None = None
    ) -> LoadedPipeline:
        """The slot's pipeline as :mod:`linfusion.app.run` takes it (``patch``: what this job applied)."""
        return LoadedPipeline(slot.pipe, self.device, params, patch or Patch("nothing applied"))

    # ------------------------------------------------------------------ memory plans
    def plan(self, request: Request) -> PlanView:
        """The memory plan of a request, without running it; a bad request gives its message as the view."""
        *_, view = self.plan_progress(request)
        return view

    def plan_progress(self, request: Request) -> Iterator[str | PlanView]:
        """Progress lines while the stages are traced (seconds each at first), then the :class:`PlanView`.

        A caller that stops iterating stops the tracing between two stages.
        """
        try:
            if not (request.prompt or "").strip():  # the plan does not depend on the words
                request = dataclasses.replace(request, prompt="plan")
            if isinstance(request, UpscaleRequest):
                with upload_header(request.image_path) as header:
                    if header is None:
                        yield PlanView(False, "Upload an image to see the plan.")
                        return
                    params, stages = self.resolve(request, header)
            else:
                params, stages = self.resolve(request)
            yield from self._plan(request, params, stages)
        except UserError as error:
            yield PlanView(False, f"Cannot plan: {error}")

    def _planning_model(self, slot: ModelSlot, linfusion: bool, vae_attention: str) -> PlanningModel:
        """A planner for the model in the requested state, traced on meta copies (the pipeline is untouched).

        Planners are kept (each caches its traces by size), so a plan shown once is instant for the job.
        """
        key = (linfusion, vae_attention)
        with self._planning_lock:
            if key not in slot.planning:
                pipe = slot.pipe
                with torch.device("meta"):  # the planner's own copies: patched here, never restored
                    unet = type(pipe.unet).from_config(pipe.unet.config).to(self.dtype)
                    vae = type(pipe.vae).from_config(pipe.vae.config).to(self.dtype)
                    if linfusion and slot.linfusion is not None:
                        LinFusion(modules_list=slot.linfusion.config.modules_list).mount(unet)
                apply_vae_attention(vae, vae_attention)
                view = SimpleNamespace(
                    unet=unet,
                    vae=vae,
                    tokenizer=pipe.tokenizer,
                    text_encoder=getattr(pipe, "text_encoder", None),
                    text_encoder_2=getattr(pipe, "text_encoder_2", None),
                    vae_scale_factor=pipe.vae_scale_factor,
                )
                slot.planning[key] = PlanningModel(
                    MemoryPlanner(view, device=self.device, dtype=self.dtype), vae
                )
            return slot.planning[key]

    def _plan(
        self, request: Request, params: GenerationParams, stages: list[Stage]
    ) -> Iterator[str | PlanView]:
        """Plan the stages one at a time (a progress line before each), keeping the numbers when it cannot fit.

        The one place the planner is called: :class:`MemoryPlanner` ``.plan`` and :class:`MemoryPlan`.
        """
        slot = self.slot(request.model)
        try:
            budget = parse_size(request.budget) if (request.budget or "").strip() else None
        except ValueError as error:
            raise UserError(f"memory budget: {error}") from error
        model = self._planning_model(slot, bool(request.linfusion), request.vae_attention)
        stage_plans = []
        for index, stage in enumerate(stages, start=1):
            yield f"Planning the memory: stage {index} of {len(stages)} ({stage.width}x{stage.height})..."
            with model.lock:
                one = model.planner.plan(
                    [stage.size],
                    budget=budget,  # None: the free memory, read once (at the first stage)
                    guidance=params.guidance > 1.0,
                    encodes=[stage.strength is not None],
                    refuse=False,
                )
            budget = one.budget
            stage_plans.extend(one.stages)
        plan = MemoryPlan(budget, self.device, tuple(stage_plans))
        budget_words = format_size(plan.budget)
        if not (request.budget or "").strip():
            budget_words += f" (free memory on {self.device.type})"
        lines = [
            _stage_line(index, stage, planned, denoising_steps(stage, params.steps))
            for index, (stage, planned) in enumerate(zip(stages, plan.stages), start=1)
        ]
        hint = quadratic_attention_hint(model.vae, [stage.size for stage in stages])
        if hint:
            lines.append(hint.replace("--vae-attention linear", 'VAE attention "linear"'))
        if plan.fits:
            head = f"Fits: estimated peak {format_size(plan.peak)} within the budget of {budget_words}."
            yield PlanView(True, "\n".join([head, *lines]), plan=plan)
            return
        head = (
            f"Does not fit the budget of {budget_words}: even with every saver on, the estimated peak is "
            f"{format_size(plan.peak)}. The smallest budget that fits is about {format_size(plan.peak)}: "
            f"enter {size_flag(plan.peak)} as the memory budget, or choose a smaller size."
        )
        yield PlanView(False, "\n".join([head, *lines]), smallest_budget=plan.peak, plan=plan)

    def _job_plan(
        self, request: Request, params: GenerationParams, stages: list[Stage], job: Job
    ) -> MemoryPlan:
        """The plan a job runs with; refuses (with the smallest budget) before any step when it cannot fit."""
        for item in self._plan(request, params, stages):
            job.check_cancelled()
            if isinstance(item, str):
                job.set_note(item)
                continue
            if not item.fits:
                raise UserError(item.text.splitlines()[0])
            job.set_note("")
            assert item.plan is not None
            return item.plan
        raise AssertionError("the planner yields a plan last")

    # ------------------------------------------------------------------ jobs (run on the device worker)
    def text_to_image(self, request: TextToImageRequest, job: Job) -> Result:
        """The Generate tab's job: plan, run, save a new PNG."""
        started = time.monotonic()
        params, stages = self.resolve(request)
        return self._run(request, params, stages, None, job, started)

    def upscale(self, request: UpscaleRequest, job: Job) -> Result:
        """The Upscale tab's job: enlarge the uploaded image, save a new PNG."""
        started = time.monotonic()
        source = open_upload(request.image_path)
        params, stages = self.resolve(request, source)
        return self._run(request, params, stages, source, job, started)

    def _run(
        self,
        request: Request,
        params: GenerationParams,
        stages: list[Stage],
        image: Image.Image | None,
        job: Job,
        started: float,
    ) -> Result:
        params = params.replace(seed=params.seed if params.seed >= 0 else secrets.randbelow(2**32))
        plan = self._job_plan(request, params, stages, job)
        job.plan(
            [StageWork(stage.width, stage.height, denoising_steps(stage, params.steps)) for stage in stages]
        )
        with self._prepared(self.slot(request.model), params) as loaded:
            result = render(loaded, params, plan, image, _step_callback(job), _stage_callback(job))
        job.check_cancelled()
        return self._save(result, params.replace(width=result.width, height=result.height), started)

    @contextlib.contextmanager
    def _prepared(self, slot: ModelSlot, params: GenerationParams) -> Iterator[LoadedPipeline]:
        """The loaded pipeline with LinFusion, VAE attention and sampler as ``params`` asks, all undone after."""
        pipe = slot.pipe
        patch = Patch("web UI job")
        try:
            with patch:
                if params.linfusion != "none" and slot.linfusion is not None:
                    patch.add(slot.linfusion.mount(pipe))
                patch.add(apply_vae_attention(pipe.vae, params.vae_attention))
                if params.scheduler != slot.scheduler_name:
                    patch.on_remove(lambda: setattr(pipe, "scheduler", slot.scheduler))
                    use_scheduler(pipe, params.scheduler)
                yield self._loaded(slot, params, patch)
        except ValueError as error:  # the pipelines' own refusals (e.g. DemoFusion with a 2nd-order sampler)
            raise UserError(str(error)) from error
        except torch.cuda.OutOfMemoryError as error:
            raise UserError(
                "the device ran out of memory (more than the plan estimated on this machine): enter a smaller "
                "memory budget, which turns on more savers, or choose a smaller size"
            ) from error
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the next plan's "free memory" budget sees what this job let go

    # ------------------------------------------------------------------ outputs
    def _save(self, image: Image.Image, params: GenerationParams, started: float) -> Result:
        path = reserve_output(self.outputs, str(params.seed))
        try:
            save_png(image, params, path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        result = Result(
            path, params.to_text(), params.seed, image.width, image.height, time.monotonic() - started
        )
        self._written.append(result)
        return result

    def recent(self, limit: int = 48) -> list[Result]:
        """Images written since this server started, newest first."""
        return list(reversed(self._written[-limit:]))

    # ------------------------------------------------------------------ dropped PNGs
    def read_parameters(self, path: str | os.PathLike) -> tuple[dict[str, Any], str]:
        """The page's field values recorded in a PNG, and a note for the page (what was restored)."""
        name = Path(path).name
        image = _open_image(path, name)
        try:
            text = image.info.get("parameters")
            if image.format != "PNG":
                raise UserError(
                    f"{name} is a {image.format} file; drop a PNG written by linfusion or an SD web UI"
                )
        finally:
            image.close()
        if not text:
            raise UserError(
                f"{name} has no 'parameters' text chunk: it was not written by linfusion or an SD web UI "
                "(or the chunk was stripped)"
            )
        try:
            params = GenerationParams.from_text(text)
        except (GenerationError, ValueError, TypeError) as error:
            raise UserError(f"{name}: cannot read its parameters ({error})") from error
        fields: dict[str, Any] = {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "width": params.width,
            "height": params.height,
            "steps": params.steps,
            "guidance": params.guidance,
            "seed": params.seed,
            "mode": params.mode if params.mode in GENERATION_MODES else "plain",
            "linfusion": params.linfusion != "none",
            "vae_attention": params.vae_attention if params.vae_attention in VAE_ATTENTION_MODES else "exact",
            "sampler": params.scheduler or "",
        }
        note = f"Restored the parameters of {name}."
        if params.model in self.model_names:
            fields["model"] = params.model
        elif params.model:
            note += f" It was made with model {params.model}, which this server was not started with."
        return fields, note


def _whole(value: Any, name: str) -> int | None:
    """A whole number from a page field (Gradio numbers arrive as floats); None stays None."""
    if value is None or value == "":
        return None
    number = float(value)
    if not number.is_integer():
        raise UserError(f"{name} must be a whole number; got {value}")
    return int(number)


def _stage_line(index: int, stage: Stage, planned: StagePlan, steps: int) -> str:
    """One stage of the plan box: its size and steps, its peak (and what it parks off the device), savers."""
    parked = f", host {format_size(planned.host_peak)}" if planned.host_peak else ""
    return (
        f"stage {index} {stage.width}x{stage.height}, {steps} steps: peak ~{format_size(planned.peak)}"
        f"{parked}; savers: {', '.join(planned.savers.names())}"
    )


def _step_callback(job: Job) -> Callable[..., dict[str, Any]]:
    """diffusers' ``callback_on_step_end``: report the step, stop here when the job was cancelled."""

    def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        job.step_done(job.stage, index + 1, getattr(pipe, "num_timesteps", None))
        return tensors

    return on_step_end


def _stage_callback(job: Job) -> Callable[[int, Stage, Image.Image], None]:
    def on_stage_end(index: int, stage: Stage, image: Image.Image) -> None:
        preview = image.copy()
        preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        job.stage_done(index, preview, f"{index + 1}: {stage.width}x{stage.height}")

    return on_stage_end


# ---------------------------------------------------------------------- files
def reserve_output(folder: Path, stem: str) -> Path:
    """A new empty file ``NNNNN-<stem>.png`` (the next free number) in ``folder``, for a PNG to replace.

    The name is taken with an exclusive create, so two jobs never get the same one and nothing is ever
    overwritten; the PNG is then written over it atomically (:func:`linfusion.app.run.save_png`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    taken = [int(match.group(1)) for p in folder.iterdir() if (match := re.match(r"(\d{5,})-", p.name))]
    for number in itertools.count(max(taken, default=0) + 1):
        candidate = folder / f"{number:05d}-{stem}.png"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise AssertionError("unreachable")


def _open_image(path: str | os.PathLike | None, name: str) -> Image.Image:
    if not path:
        raise UserError("no file was uploaded")
    try:
        with Image.open(path) as probe:
            probe.verify()  # a truncated or corrupt file fails here, before any decoding work
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise UserError(f"{name} has too many pixels to open safely") from error
    except UnidentifiedImageError as error:
        raise UserError(f"{name} is not a readable image (PNG, JPEG or WebP expected)") from error
    except (OSError, SyntaxError, ValueError) as error:
        reason = str(error).replace(str(path), name)  # the page is not told where the server keeps uploads
        raise UserError(f"{name} is not a readable image (damaged or cut short: {reason})") from error
    return image


def open_upload(path: str | os.PathLike | None) -> Image.Image:
    """An uploaded image to enlarge, as RGB; :class:`UserError` saying what is wrong otherwise."""
    name = Path(path).name if path else "the upload"
    image = _open_image(path, name)
    with image:
        if image.format not in UPLOAD_FORMATS:
            raise UserError(f"{name} is a {image.format} image; upload a PNG, JPEG or WebP")
        if image.width * image.height > MAX_UPLOAD_PIXELS:
            raise UserError(
                f"{name} is {image.width}x{image.height}; this page enlarges images of up to "
                f"{MAX_UPLOAD_PIXELS:,} pixels"
            )
        if min(image.size) < 8:
            raise UserError(f"{name} is {image.width}x{image.height}; it needs at least 8 pixels per side")
        try:
            return image.convert("RGB")
        except OSError as error:
            raise UserError(f"{name} could not be decoded: {error}") from error


@contextlib.contextmanager
def upload_header(path: str | os.PathLike | None) -> Iterator[Image.Image | None]:
    """An upload opened for its size only (no pixels decoded), or None when it cannot be read."""
    if not path:
        yield None
        return
    try:
        image = Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError):
        yield None
        return
    with image:
        yield image if image.format in UPLOAD_FORMATS else None


__all__ = [
    "MODE_LABELS",
    "SCHEDULERS",  # the Sampler choices of the page
    "UPSCALE_MODES",
    "Backend",
    "JobSettings",
    "PlanView",
    "Result",
    "TextToImageRequest",
    "UpscaleRequest",
    "open_device",
    "open_upload",
    "reserve_output",
    "upload_header",
]
