"""The ``linfusion ui`` page: Gradio components and their events, nothing else.

Every request goes through :class:`linfusion.ui.backend.Backend` (models, plans, the jobs' work) and every
job through :class:`linfusion.ui.jobs.JobRunner` (one at a time on the device). Handlers never raise:
a bad request, an impossible budget or a failed job is a message in the tab's status line, and the next
job works as before.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from ..choices import SCHEDULERS
from ..errors import UserError
from .backend import Backend
from .jobs import CANCELLED, DONE, FAILED, FINISHED, RUNNING, WAITING, Job, JobRunner
from .outputs import Result, open_upload
from .planning import PlanView
from .queue_view import ordinal, queue_entries, queue_html, wire_queue
from .remembered import wire_remembered, wire_reset
from .requests import MAX_BATCH, MODE_LABELS, UPSCALE_MODES, TextToImageRequest, UpscaleRequest, batch_seeds

logger = logging.getLogger(__name__)

CUSTOM = -1  # the Size preset's value when Width and Height are not one of the presets
SIZE_PRESETS = [
    ("custom", CUSTOM),
    ("native", 0),
    ("512", 512),
    ("768", 768),
    ("1024", 1024),
    ("1536", 1536),
    ("2K (2048)", 2048),
    ("4K UHD (3840)", 3840),
    ("4K (4096)", 4096),
    ("8K UHD (7680)", 7680),
    ("8K (8192)", 8192),
    ("16K UHD (15360)", 15360),
    ("16K (16384)", 16384),
]
ASPECT_RATIOS = ["1:1", "4:3", "3:2", "16:9", "21:9", "3:4", "2:3", "9:16"]


def sampler_choices(model_default: str) -> list[tuple[str, str]]:
    """The Sampler menu: the model's own scheduler (named, as the Parameters text names it), then the rest."""
    return [(f"{model_default} (default)", ""), *((name, name) for name in SCHEDULERS)]


STATUS_EVERY = 0.5  # seconds between progress lines while nothing else changes
GALLERY = {
    "fit_columns": False,
    "interactive": False,
    "object_fit": "contain",
    "buttons": ["download", "fullscreen"],
}


# ---------------------------------------------------------------------- texts
def size_for(long_side: int, ratio: str) -> tuple[int, int]:
    """Width and height (multiples of 8) with ``long_side`` on the longer side and the aspect ``ratio``."""
    across, down = (int(part) for part in ratio.split(":"))
    short = max(8, round(long_side * min(across, down) / max(across, down) / 8) * 8)
    return (long_side, short) if across >= down else (short, long_side)


def preset_reading(width: Any, height: Any, long_side: int | None, ratio: str | None, native: int) -> int:
    """What the Size preset reads: ``long_side`` while Width and Height are what it gives, else custom."""
    if long_side is None or long_side == CUSTOM:
        return CUSTOM
    return long_side if (width, height) == size_for(long_side or native, ratio or "1:1") else CUSTOM


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def status_line(job: Job, runner: JobRunner) -> str:
    """What the page says about ``job`` now, and how many more of this page's jobs wait behind it."""
    line = job_line(job, runner)
    if job.state in FINISHED:
        return line
    pending = runner.pending(job.owner, job.label)
    behind = len(pending) - 1 - pending.index(job) if job in pending else 0
    return f"{line} ({behind} more of yours queued)" if behind else line


def job_line(job: Job, runner: JobRunner) -> str:
    """What the page says about ``job`` now: its place in the queue, its progress, or how it ended."""
    if job.state == WAITING:
        position, ahead = runner.position(job) or 1, runner.ahead(job)
        return (
            f"Waiting: {ordinal(position)} in the queue "
            f"({ahead} job{'s' if ahead != 1 else ''} ahead of yours on the device)."
        )
    if job.state == RUNNING:
        if job.cancel_requested:
            return "Cancelling: the job stops after the current step..."
        if job.note or not job.stages:
            return job.note or "Starting..."
        index = min(job.stage, len(job.stages) - 1)
        stage = job.stages[index]
        line = (
            f"{progress_bar(job.fraction_done())} Stage {index + 1} of {len(job.stages)} "
            f"({stage.width}x{stage.height}) · "
            f"step {job.step} of {job.stage_steps or stage.steps} · {_seconds(job.elapsed())} elapsed"
        )
        remaining = job.remaining()
        return line if remaining is None else f"{line} · about {_seconds(remaining)} left"
    if job.state == DONE:
        result: Result = job.result
        return (
            f"Done in {_seconds(result.seconds)}: {result.width}x{result.height}, seed {result.seed}, "
            f"saved as {result.path.name}."
        )
    if job.state == CANCELLED:
        if job.started is None:
            return "Cancelled before it started."
        where = (
            f"stage {job.stage + 1} of {len(job.stages)}, step {job.step}" if job.stages else "while planning"
        )
        return f"Cancelled ({where}); nothing was saved."
    return f"Error: {job.error}"


def mode_hint(mode: str, width: Any, height: Any, native: int) -> str:
    """A warning for plain mode above the model's native size, where objects repeat; empty otherwise."""
    try:
        long_side = max(int(width), int(height))
    except (TypeError, ValueError):
        return ""
    if mode != "plain" or long_side <= native:
        return ""
    return (
        f"Plain mode above the model's native {native} px repeats objects: for a coherent image at "
        f"{int(width)}x{int(height)} choose *SDEdit chain* or *DemoFusion*."
    )


def progress_bar(fraction: float, width: int = 20) -> str:
    """A text progress bar with its percentage, e.g. ``[#####...............] 25%``."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction:.0%}"


class PlanOrder:
    """Which plan request of a page is the newest, by the number the page gave it when it sent it.

    Requests are numbered in the browser (:data:`PLAN_NUMBERING_JS`), so two quick changes cannot swap
    places on their way through the server's threads: only the newest plan is shown, and an older one
    still tracing stops between two stages.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._newest: dict[tuple[str, str], float] = {}

    def offer(self, session: str, tab: str, number: float) -> bool:
        """Record ``number`` unless a newer request was seen; True when it is the newest."""
        with self._lock:
            if number < self._newest.get((session, tab), float("-inf")):
                return False
            self._newest[(session, tab)] = number
            return True

    def newest(self, session: str, tab: str, number: float) -> bool:
        with self._lock:
            return self._newest.get((session, tab)) == number


# Runs in the page before each plan request: numbers it (the first input) in the order of the changes.
PLAN_NUMBERING_JS = (
    "(number, ...values) => [(window.linfusionPlans = (window.linfusionPlans || 0) + 1), ...values]"
)


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


# ---------------------------------------------------------------------- components
@dataclass
class Settings:
    """The settings both tabs share, below their own inputs."""

    mode: gr.Radio
    steps: gr.Number
    guidance: gr.Number
    seed: gr.Number
    linfusion: gr.Checkbox
    vae_attention: gr.Radio
    budget: gr.Textbox
    sampler: gr.Dropdown
    model: gr.Dropdown

    def request_fields(self, values: dict) -> dict[str, Any]:
        return {
            "mode": values[self.mode],
            "steps": values[self.steps],
            "guidance": values[self.guidance],
            "seed": values[self.seed],
            "linfusion": bool(values[self.linfusion]),
            "vae_attention": values[self.vae_attention],
            "budget": values[self.budget] or "",
            "sampler": values[self.sampler] or "",
            "model": values[self.model],
        }

    def components(self) -> list:
        return list(vars(self).values())


@dataclass
class Outputs:
    """What a tab shows about its job: status line, plan, result, its PNG, parameters, stage previews."""

    status: gr.Markdown
    plan: gr.Textbox
    result: gr.Image
    download: gr.DownloadButton
    parameters: gr.Textbox
    stages: gr.Gallery
    gallery: gr.Gallery | None = None  # images of this run (Generate tab)
    seed: gr.State | None = None  # the seed of the last result, for "Reuse last seed" (Generate tab)


def _settings(tab: str, backend: Backend, modes: list[str], default_mode: str, mode_info: str) -> Settings:
    mode = gr.Radio([(MODE_LABELS[m], m) for m in modes], value=default_mode, label="Mode", info=mode_info,
                    elem_id=f"{tab}-mode")  # fmt: skip
    with gr.Row():
        steps = gr.Number(25, label="Steps", precision=0, elem_id=f"{tab}-steps")  # checked with the request
        guidance = gr.Number(7.5, label="Guidance", info="CFG scale", elem_id=f"{tab}-guidance")
        seed = gr.Number(-1, label="Seed", precision=0, info="-1: random", elem_id=f"{tab}-seed")
    with gr.Row():
        linfusion = gr.Checkbox(True, label="LinFusion", info="linear attention; off: the model's softmax "
                                "attention, to compare", elem_id=f"{tab}-linfusion")  # fmt: skip
        vae = gr.Radio(["exact", "linear"], value="exact", label="VAE attention", info="linear: fast decodes "
                       "at 4K and more (a close approximation)", elem_id=f"{tab}-vae")  # fmt: skip
    with gr.Row():
        budget = gr.Textbox(label="Memory budget", placeholder="free memory (e.g. 8GB)", scale=2,
                            elem_id=f"{tab}-budget")  # fmt: skip
        default_sampler = backend.slot(backend.model_names[0]).scheduler_name
        sampler = gr.Dropdown(
            sampler_choices(default_sampler), value="", label="Sampler", elem_id=f"{tab}-sampler"
        )
        model = gr.Dropdown(
            backend.model_names, value=backend.model_names[0], label="Model", elem_id=f"{tab}-model"
        )
    return Settings(mode, steps, guidance, seed, linfusion, vae, budget, sampler, model)


def _outputs(tab: str, generate_tab: bool) -> Outputs:
    """Status and plan on top (the plan is in view before anything runs), then the result and its stages."""
    status = gr.Markdown("Ready." if tab == "t2i" else "Upload an image to enlarge.", elem_id=f"{tab}-status")
    plan = gr.Textbox(label="Memory plan", lines=3, max_lines=16, interactive=False, elem_id=f"{tab}-plan",
                      elem_classes="plan")  # fmt: skip
    result = gr.Image(label="Result", type="filepath", format="png", interactive=False, alt_text="Result",
                      buttons=["download", "fullscreen"], height=360, elem_id=f"{tab}-result",
                      elem_classes="pixel-view")  # fmt: skip
    stages = gr.Gallery(label="Stages", columns=6, height=150, elem_id=f"{tab}-stages", **GALLERY)
    download = gr.DownloadButton("Download PNG", visible=False, elem_id=f"{tab}-download")
    parameters = gr.Textbox(label="Parameters", interactive=False, lines=3, elem_id=f"{tab}-parameters",
                            info="as written into the PNG: LinFusion auto = on, none = off; Sampler: the "
                            "one that ran")  # fmt: skip
    if not generate_tab:
        return Outputs(status, plan, result, download, parameters, stages)
    run_gallery = gr.Gallery(label="Images of this run", columns=6, height=240, elem_id=f"{tab}-gallery",
                             **GALLERY)  # fmt: skip
    return Outputs(status, plan, result, download, parameters, stages, run_gallery, gr.State(None))


# ---------------------------------------------------------------------- the two tabs
@dataclass
class GenerateTab:
    """The Generate tab's components."""

    prompt: gr.Textbox
    negative: gr.Textbox
    run: gr.Button
    cancel: gr.Button
    width: gr.Number
    height: gr.Number
    batch: gr.Number
    preset: gr.Dropdown
    ratio: gr.Dropdown
    settings: Settings
    reuse: gr.Button
    send: gr.Button
    restore: gr.File
    hint: gr.Markdown
    hires: gr.Button
    reset: gr.Button
    out: Outputs

    @property
    def fields(self) -> list:
        return [self.prompt, self.negative, self.width, self.height, self.batch, *self.settings.components()]

    def kept_fields(self) -> dict[str, Any]:
        """The fields a reload keeps (:mod:`linfusion.ui.remembered`), by names that stay the same."""
        names = ["prompt", "negative", "width", "height", "batch", "preset", "ratio", *vars(self.settings)]
        fields = [*self.fields[:5], self.preset, self.ratio, *self.settings.components()]
        return {f"generate.{name}": field for name, field in zip(names, fields, strict=True)}

    def request(self, values: dict) -> TextToImageRequest:
        return TextToImageRequest(prompt=values[self.prompt] or "", negative_prompt=values[self.negative] or "",
                                  width=values[self.width], height=values[self.height],
                                  **self.settings.request_fields(values))  # fmt: skip


@dataclass
class UpscaleTab:
    """The Upscale tab's components."""

    source: gr.File
    preview: gr.Image
    scale: gr.Number
    prompt: gr.Textbox
    negative: gr.Textbox
    run: gr.Button
    cancel: gr.Button
    settings: Settings
    reset: gr.Button
    out: Outputs

    @property
    def fields(self) -> list:
        return [self.source, self.scale, self.prompt, self.negative, *self.settings.components()]

    def kept_fields(self) -> dict[str, Any]:
        """The settings a reload keeps: not the image, nor the prompt that describes it."""
        names = ["scale", *vars(self.settings)]
        return {
            f"upscale.{name}": field for name, field in zip(names, [self.scale, *self.settings.components()])
        }

    def request(self, values: dict) -> UpscaleRequest:
        factor = values[self.scale]
        return UpscaleRequest(image_path=values[self.source], scale=0 if factor is None else factor,
                              prompt=values[self.prompt] or "", negative_prompt=values[self.negative] or "",
                              **self.settings.request_fields(values))  # fmt: skip


def _generate_tab(backend: Backend, native: int) -> GenerateTab:
    with gr.Tab("Generate", id="generate", elem_id="tab-generate"), gr.Row():
        with gr.Column(scale=5):
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="t2i-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="t2i-negative")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                cancel = gr.Button("Cancel", variant="stop", elem_id="t2i-cancel")
            with gr.Row():
                width = gr.Number(native, label="Width", precision=0, info="a multiple of 8",
                                  elem_id="t2i-width")  # fmt: skip
                height = gr.Number(native, label="Height", precision=0, info="a multiple of 8",
                                   elem_id="t2i-height")  # fmt: skip
                batch = gr.Number(1, label="Batch count", precision=0, info=f"1 to {MAX_BATCH}; seeds +1",
                                  elem_id="t2i-batch")  # fmt: skip
            with gr.Row():
                preset = gr.Dropdown(SIZE_PRESETS, value=0, label="Size preset", info="long side; "
                                     f"native: {native} px", elem_id="t2i-preset")  # fmt: skip
                ratio = gr.Dropdown(ASPECT_RATIOS, value="1:1", label="Aspect ratio", info="width:height",
                                    elem_id="t2i-ratio")  # fmt: skip
            settings = _settings("t2i", backend, list(MODE_LABELS), "plain", "plain: one pass at the size; "
                                 "SDEdit chain / DemoFusion: the native size, then enlargement stages "
                                 "(for 2K-16K)")  # fmt: skip
            with gr.Row():
                hint = gr.Markdown("", elem_id="t2i-mode-hint")
                hires = gr.Button("Use SDEdit chain", size="sm", visible=False, elem_id="t2i-hires")
            with gr.Row():
                reuse = gr.Button("Reuse last seed", size="sm", elem_id="t2i-reuse-seed")
                send = gr.Button("Send result to Upscale", size="sm", elem_id="t2i-send")
                reset = gr.Button("Reset to defaults", size="sm", elem_id="t2i-reset")
            restore = gr.File(label="Drop a PNG here to restore its parameters", type="filepath",
                              height=150, elem_id="t2i-restore")  # fmt: skip
        with gr.Column(scale=6):
            out = _outputs("t2i", generate_tab=True)
    return GenerateTab(prompt, negative, generate, cancel, width, height, batch, preset, ratio, settings, reuse, send,
                       restore, hint, hires, reset, out)  # fmt: skip


def _upscale_tab(backend: Backend) -> UpscaleTab:
    with gr.Tab("Upscale", id="upscale", elem_id="tab-upscale"), gr.Row():
        with gr.Column(scale=5):
            source = gr.File(label="Image to enlarge", type="filepath", height=150, elem_id="up-file")
            preview = gr.Image(label="Input", interactive=False, height=200, elem_id="up-preview",
                               elem_classes="pixel-view")  # fmt: skip
            scale = gr.Number(2, label="Scale", info="e.g. 2 or 4 (width and height)", elem_id="up-scale")
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="what the image shows (guides "
                                "the new detail)", elem_id="up-prompt")  # fmt: skip
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="up-negative")
            with gr.Row():
                run = gr.Button("Upscale", variant="primary", elem_id="up-run")
                cancel = gr.Button("Cancel", variant="stop", elem_id="up-cancel")
            settings = _settings("up", backend, list(UPSCALE_MODES), "sdedit", "the enlargement stages")
            reset = gr.Button("Reset to defaults", size="sm", elem_id="up-reset")
        with gr.Column(scale=6):
            out = _outputs("up", generate_tab=False)
    return UpscaleTab(source, preview, scale, prompt, negative, run, cancel, settings, reset, out)


QUIET = {"show_progress": "hidden", "concurrency_limit": None}


# ---------------------------------------------------------------------- events
def _wire_plans(page: gr.Blocks, backend: Backend, t2i: GenerateTab, up: UpscaleTab) -> None:
    """The plan box of each tab, re-planned whenever an input that changes the plan changes."""
    order = PlanOrder()
    plan_number = gr.Number(0, visible=False)  # set by PLAN_NUMBERING_JS in the page

    def plan_lines(tab: str, number: float, request_value: Any, session: str) -> Iterator[str]:
        if not order.offer(session, tab, number):
            return  # a newer request of this page was already planned or is being planned
        try:
            for item in backend.plan_progress(request_value):
                if not order.newest(session, tab, number):
                    return  # a newer request of this page replaces this plan
                yield item.text if isinstance(item, PlanView) else item
        except Exception as error:  # a bug: logged; the plan box says so and the server goes on
            logger.exception("planning failed")
            yield f"Cannot plan: internal error ({type(error).__name__}): {error}; the server's log has the traceback"

    def t2i_plan(request: gr.Request, number: float, *values: Any) -> Iterator[str]:
        yield from plan_lines("t2i", number, t2i.request(dict(zip(t2i.fields, values))), _session(request))

    def up_plan(request: gr.Request, number: float, *values: Any) -> Iterator[str]:
        yield from plan_lines("up", number, up.request(dict(zip(up.fields, values))), _session(request))

    planning = {"js": PLAN_NUMBERING_JS, "trigger_mode": "multiple", **QUIET}
    one, other = t2i.settings, up.settings
    plan_triggers = [t2i.width.change, t2i.height.change, one.mode.change, one.model.change, one.budget.change,
                     one.linfusion.change, one.vae_attention.change, one.guidance.change, one.steps.change,
                     one.sampler.change, one.seed.change, page.load]  # fmt: skip
    gr.on(plan_triggers, t2i_plan, [plan_number, *t2i.fields], t2i.out.plan, **planning)
    up_triggers = [up.source.change, up.scale.change, other.mode.change, other.model.change, other.budget.change,
                   other.linfusion.change, other.vae_attention.change, other.guidance.change, other.steps.change,
                   other.sampler.change, other.seed.change]  # fmt: skip
    gr.on(up_triggers, up_plan, [plan_number, *up.fields], up.out.plan, **planning)

    _wire_samplers(backend, one, other)
    _wire_mode_hint(page, backend, t2i)


def _wire_mode_hint(page: gr.Blocks, backend: Backend, t2i: GenerateTab) -> None:
    """The hint next to Mode when plain mode is asked above the model's native size, with a switch to the
    SDEdit chain."""
    mode = t2i.settings.mode

    def show_hint(mode_value: str, width: Any, height: Any, model_name: str) -> dict:
        text = mode_hint(mode_value, width, height, backend.native_size(model_name))
        return {t2i.hint: text, t2i.hires: gr.Button(visible=bool(text))}

    triggers = [t2i.width.change, t2i.height.change, mode.change, t2i.settings.model.change, page.load]
    gr.on(
        triggers, show_hint, [mode, t2i.width, t2i.height, t2i.settings.model], [t2i.hint, t2i.hires], **QUIET
    )
    t2i.hires.click(lambda: "sdedit", None, mode, **QUIET)


def _wire_presets(backend: Backend, t2i: GenerateTab, restores: list[gr.events.Dependency]) -> None:
    """Size preset and Aspect ratio set Width and Height when one is chosen (never when merely left);
    the preset reads "custom" while Width and Height are not what it would give.

    The reading follows what the user types and ``restores`` (events that set Width and Height from a
    PNG), each once it is done; never a change in flight, whose values the page may send stale.
    """
    model = t2i.settings.model

    def apply_preset(long_side: int | None, aspect: str, model_name: str, width: Any, height: Any) -> tuple:
        if long_side is None or long_side == CUSTOM:  # a ratio chosen for a custom size: keep its long side
            try:
                long_side = max(int(width or 0), int(height or 0))
            except (TypeError, ValueError):
                long_side = 0
        return size_for(long_side or backend.native_size(model_name), aspect or "1:1")

    def preset_of(width: Any, height: Any, long_side: int | None, aspect: str, model_name: str) -> int:
        return preset_reading(width, height, long_side, aspect, backend.native_size(model_name))

    sizes = [t2i.preset, t2i.ratio, model, t2i.width, t2i.height]
    gr.on([t2i.preset.select, t2i.ratio.select], apply_preset, sizes, [t2i.width, t2i.height], **QUIET)
    reading = [t2i.width, t2i.height, t2i.preset, t2i.ratio, model]
    gr.on([t2i.width.input, t2i.height.input], preset_of, reading, t2i.preset, **QUIET)
    for restore in restores:
        restore.then(preset_of, reading, t2i.preset, **QUIET)


def _wire_remembered(page: gr.Blocks, backend: Backend, t2i: GenerateTab, up: UpscaleTab) -> None:
    """Both tabs' settings kept in the browser; the Size preset put back only where it matches the size."""
    kept = {**t2i.kept_fields(), **up.kept_fields()}

    def settle(values: dict[str, Any]) -> dict[str, Any]:
        size = (values["generate.width"], values["generate.height"], values["generate.preset"])
        native = backend.native_size(values["generate.model"])
        return {**values, "generate.preset": preset_reading(*size, values["generate.ratio"], native)}

    wire_remembered(page, kept, settle)
    wire_reset(t2i.reset, t2i.kept_fields())
    wire_reset(up.reset, up.kept_fields())


def _wire_samplers(backend: Backend, *all_settings: Settings) -> None:
    """The Sampler menu names the chosen model's own scheduler."""
    for settings in all_settings:
        settings.model.change(
            lambda name: gr.Dropdown(choices=sampler_choices(backend.slot(name).scheduler_name)),
            settings.model,
            settings.sampler,
            **QUIET,
        )


def _watch(job: Job, out: Outputs, backend: Backend, runner: JobRunner, queue: gr.HTML) -> Iterator[dict]:
    """Page updates while ``job`` waits and runs, then its result or its error.

    While an earlier job of the same page and tab is unfinished, that job's watcher has the tab's outputs
    (its status line counts this one as queued): this one stays quiet until its turn.
    """
    seen, shown_stages, last_line, last_time, last_queue, shown_preview = -1, 0, None, 0.0, None, None
    while True:
        runner.wait(job, seen, STATUS_EVERY)
        with runner.lock:  # one consistent reading: the job may end while this update is sent
            seen, state, line = job.version, job.state, status_line(job, runner)
            stage_images, preview = list(job.stage_images), job.preview
            pending = runner.pending(job.owner, job.label)
            behind_another = job in pending and pending.index(job) > 0
            entries = queue_entries(runner, job.owner)
        if behind_another:
            continue
        update: dict = {}
        if entries != last_queue:
            last_queue = entries
            update[queue] = queue_html(entries)
        now = time.monotonic()
        if line != last_line or now - last_time >= STATUS_EVERY:
            update[out.status] = line
            last_line, last_time = line, now
        if preview is not None and preview is not shown_preview and state == RUNNING:
            update[out.result] = shown_preview = preview  # the image as it denoises, until the result
        if state in (CANCELLED, FAILED) and shown_preview is not None:
            update[out.result] = None  # nothing was saved: no preview of it stays
        if state == CANCELLED and shown_stages:
            update[out.stages] = []  # nothing was saved: no stage of it stays on the page
        elif len(stage_images) != shown_stages:
            shown_stages = len(stage_images)
            update[out.stages] = stage_images
        if state == DONE:
            finished: Result = job.result
            update[out.result] = str(finished.path)
            update[out.download] = gr.DownloadButton(value=str(finished.path), visible=True)
            update[out.parameters] = finished.parameters
            if out.seed is not None:
                update[out.seed] = finished.seed
            if out.gallery is not None:
                update[out.gallery] = [(str(r.path), r.path.name) for r in backend.recent()]
        if update:
            yield update
        if state in FINISHED:
            return


def _job_title(request: TextToImageRequest | UpscaleRequest) -> str:
    """What the queue calls a job: its kind, size or source, and seed."""
    seed = "random seed" if request.seed < 0 else f"seed {int(request.seed)}"  # checked by params_for
    if isinstance(request, UpscaleRequest):
        return f"Upscale {Path(request.image_path or '?').name} x{request.scale}, {seed}"
    return f"Generate {request.width}x{request.height}, {seed}"


def _wire_jobs(
    page: gr.Blocks, backend: Backend, runner: JobRunner, t2i: GenerateTab, up: UpscaleTab, queue: gr.HTML
) -> None:
    """Generate, Upscale and Cancel: a job on the queue, watched until it ends."""

    def submit(kind: str, request_value: Any, session: str, out: Outputs, count: Any = 1) -> Iterator[dict]:
        busy = bool(runner.pending(session, kind))  # a job of this tab runs: its outputs stay
        cleared = {} if busy else {out.stages: [], out.download: gr.DownloadButton(visible=False)}
        try:
            backend.params_for(request_value)  # refuse a bad request at once, without queueing it
            batch = [
                dataclasses.replace(request_value, seed=seed)
                for seed in batch_seeds(request_value.seed, count)
            ]
            for item in batch[1:]:
                backend.params_for(item)  # the batch's last seeds too
            work = backend.text_to_image if kind == "generate" else backend.upscale
            if len(batch) > runner.max_waiting:
                raise UserError(
                    f"batch count {len(batch)}: the queue holds at most {runner.max_waiting} jobs"
                )
            jobs = [runner.submit(session, kind, partial(work, item), _job_title(item)) for item in batch]
        except UserError as error:
            if busy:  # the status line is the running job's: say it aside
                gr.Warning(f"Error: {error}")
                return
            yield {**cleared, out.status: f"Error: {error}"}
            return
        if busy:
            gr.Info(f"Queued after your running job. {job_line(jobs[0], runner)}")
            yield {queue: queue_html(queue_entries(runner, session))}
        else:
            yield {
                **cleared,
                out.status: status_line(jobs[0], runner),
                queue: queue_html(queue_entries(runner, session)),
            }
        for job in jobs:  # one after the other: each takes the status line in its turn
            yield from _watch(job, out, backend, runner, queue)

    def run_generate(values: dict, request: gr.Request) -> Iterator[dict]:
        yield from submit("generate", t2i.request(values), _session(request), t2i.out, values[t2i.batch])

    def run_upscale(values: dict, request: gr.Request) -> Iterator[dict]:
        yield from submit("upscale", up.request(values), _session(request), up.out)

    def cancel_jobs(request: gr.Request) -> str:
        if not runner.cancel(_session(request)):
            gr.Info("Nothing to cancel.")
        return queue_html(queue_entries(runner, _session(request)))

    t2i_outputs = set(vars(t2i.out).values()) - {t2i.out.plan} | {queue}
    up_outputs = set(vars(up.out).values()) - {up.out.plan, None} | {queue}
    queueing = {"trigger_mode": "multiple", **QUIET}  # a click while a job runs queues another (docs/ui.md)
    gr.on([t2i.run.click, t2i.prompt.submit], run_generate, set(t2i.fields), t2i_outputs, **queueing)
    up.run.click(run_upscale, set(up.fields), up_outputs, **queueing)
    gr.on([t2i.cancel.click, up.cancel.click], cancel_jobs, None, queue, **QUIET)

    def page_closed(request: gr.Request) -> None:
        runner.cancel(_session(request))  # nobody is watching: free the device

    page.unload(page_closed)


def _wire_files(
    backend: Backend, tabs: gr.Tabs, t2i: GenerateTab, up: UpscaleTab
) -> list[gr.events.Dependency]:
    """Seeds, dropped PNGs and uploads: reuse the last seed, send a result on, restore, check an upload.
    Returns the events that restore a PNG's fields."""
    t2i.reuse.click(lambda used, current: current if used is None else used, [t2i.out.seed, t2i.settings.seed],
                    t2i.settings.seed, **QUIET)  # fmt: skip

    def check_upload(path: str | None) -> dict:
        try:
            image = open_upload(path)
        except UserError as error:  # emptied, so the next upload is a fresh one
            return {up.source: None, up.preview: None, up.out.status: f"Error: {error}"}
        return {up.preview: path, up.out.status: f"{Path(path).name}: {image.width}x{image.height}. Ready."}

    carried = {"prompt": up.prompt, "negative_prompt": up.negative, "seed": up.settings.seed,
               "guidance": up.settings.guidance, "linfusion": up.settings.linfusion,
               "vae_attention": up.settings.vae_attention, "sampler": up.settings.sampler,
               "model": up.settings.model}  # fmt: skip

    def send_to_upscale(image: str | None) -> dict:
        if not image:
            return {t2i.out.status: "Generate an image first."}
        update = {**check_upload(image), up.source: image, tabs: gr.Tabs(selected="upscale")}
        try:  # the result's own prompt, seed and settings guide its enlargement
            fields, _ = backend.read_parameters(image)
        except UserError:
            return update
        return {**update, **{carried[name]: value for name, value in fields.items() if name in carried}}

    t2i.send.click(send_to_upscale, t2i.out.result, {t2i.out.status, up.source, up.preview, up.out.status, tabs,
                   *carried.values()}, **QUIET)  # fmt: skip
    settings = t2i.settings
    restorable = {"prompt": t2i.prompt, "negative_prompt": t2i.negative, "width": t2i.width, "height": t2i.height,
                  "steps": settings.steps, "guidance": settings.guidance, "seed": settings.seed,
                  "mode": settings.mode, "linfusion": settings.linfusion, "vae_attention": settings.vae_attention,
                  "sampler": settings.sampler, "model": settings.model}  # fmt: skip

    def restore_from(path: str | Path, name: str) -> dict:
        try:
            fields, note = backend.read_parameters(path)
        except UserError as error:
            return {t2i.out.status: f"Error: {error}"}
        except Exception as error:  # a bug: logged; the status line says so
            logger.exception("reading %s failed", name)
            return {t2i.out.status: f"Error: cannot read {name} ({type(error).__name__})"}
        return {t2i.out.status: note, **{restorable[key]: value for key, value in fields.items()}}

    def restore_parameters(path: str | None) -> dict:
        if not path:
            return {}
        return {t2i.restore: None, **restore_from(path, Path(path).name)}  # emptied, ready for the next drop

    def restore_result(selected: gr.SelectData) -> dict:
        """A click on an image of this run: its settings back in the fields, found by its file name among
        the outputs (never a path the page sends)."""
        name = (selected.value or {}).get("caption") if isinstance(selected.value, dict) else None
        result = next((r for r in backend.recent() if r.path.name == name), None)
        if result is None:
            return {t2i.out.status: f"Error: {name or 'that image'} is no longer in the outputs folder"}
        return restore_from(result.path, result.path.name)

    restores = [t2i.restore.upload(restore_parameters, t2i.restore, {t2i.restore, t2i.out.status,
                                   *restorable.values()}, **QUIET)]  # fmt: skip
    if t2i.out.gallery is not None:
        restores.append(t2i.out.gallery.select(restore_result, None, {t2i.out.status, *restorable.values()},
                                               **QUIET))  # fmt: skip
    up.source.upload(check_upload, up.source, {up.source, up.preview, up.out.status}, **QUIET)
    up.source.clear(lambda: {up.preview: None, up.out.status: "Upload an image to enlarge."}, None,
                    {up.preview, up.out.status}, **QUIET)  # fmt: skip
    return restores


# ---------------------------------------------------------------------- the page
def build_page(backend: Backend, runner: JobRunner) -> gr.Blocks:
    """The Blocks of the page; launching it is :mod:`linfusion.ui.server`'s business."""
    native = backend.native_size(backend.model_names[0])
    with gr.Blocks(title="LinFusion", analytics_enabled=False) as page:
        gr.Markdown(
            "# LinFusion\nStable Diffusion with linear attention, for images far beyond the model's native "
            f"size. Device: **{backend.device.type}**; models: {', '.join(backend.model_names)}. The memory "
            "plan is shown before anything runs."
        )
        with gr.Tabs() as tabs:
            t2i = _generate_tab(backend, native)
            up = _upscale_tab(backend)
        queue = wire_queue(runner, _session)
        _wire_plans(page, backend, t2i, up)
        _wire_jobs(page, backend, runner, t2i, up, queue)
        _wire_presets(backend, t2i, _wire_files(backend, tabs, t2i, up))
        _wire_remembered(page, backend, t2i, up)
    return page
