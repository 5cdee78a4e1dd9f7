"""What the page's tabs send, and its one check: the page's fields become typed values here, once.

A :class:`TextToImageRequest` or :class:`UpscaleRequest` holds the fields as Gradio gives them (numbers may
arrive as floats, the memory budget as text); :func:`request_params` turns them into
:class:`~linfusion.app.params.GenerationParams` (checked by its own ``validate``, the command line's
messages) and :func:`budget_bytes` the budget into bytes, or raises a :class:`~linfusion.errors.UserError`
saying what to change.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import Any

from ..app.params import GenerationError, GenerationParams
from ..app.prepare import UPSCALE_PROMPT, upscale_params
from ..choices import BUNDLED_MODEL_NAME, CHAIN_MODES, MAX_STEPS, SCHEDULERS, VAE_ATTENTION_MODES
from ..errors import UserError
from ..io import parse_size
from .models import ModelSlot

MAX_SIDE = 32768  # pixels per side the page accepts (the presets stop at 16K)
MAX_BATCH = 16  # images one click of Generate may queue
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


def whole(value: Any, name: str) -> int | None:
    """A whole number from a page field (Gradio numbers arrive as floats); None stays None."""
    if value is None or value == "":
        return None
    number = float(value)
    if not number.is_integer():
        raise UserError(f"{name} must be a whole number; got {value}")
    return int(number)


def budget_bytes(text: str | None) -> int | None:
    """The memory budget field in bytes; empty: None (the device's free memory)."""
    if not (text or "").strip():
        return None
    try:
        return parse_size(text or "")
    except ValueError as error:
        raise UserError(f"memory budget: {error}") from error


def check_choices(request: Request, slot: ModelSlot) -> None:
    """Refuse what the page's menus cannot send (a request made by hand) and LinFusion a model lacks."""
    if request.sampler and request.sampler not in SCHEDULERS:
        raise UserError(f"unknown sampler {request.sampler!r}; choose one of {', '.join(SCHEDULERS)}")
    if request.vae_attention not in VAE_ATTENTION_MODES:
        raise UserError(f"unknown VAE attention {request.vae_attention!r}")
    if request.linfusion and slot.linfusion is None:
        raise UserError(
            f"LinFusion is not available for model {slot.name}: {slot.linfusion_error} "
            "Untick LinFusion to run the model's own attention."
        )
    if isinstance(request, UpscaleRequest) and request.mode not in UPSCALE_MODES:
        raise UserError(f"unknown upscale mode {request.mode!r}; choose {' or '.join(UPSCALE_MODES)}")


def request_params(request: Request, slot: ModelSlot) -> GenerationParams:
    """The request as the PNG will record it, checked; raises :class:`UserError` with what to change.

    An upscale's size is left out here: it follows from the upload (:func:`upscale_request_params`).
    """
    check_choices(request, slot)
    upscaling = isinstance(request, UpscaleRequest)
    if not upscaling and not (request.prompt or "").strip():
        raise UserError("the prompt is empty: say what to draw, e.g. a red circle on a gray background")
    for name, example in (("steps", "25"), ("guidance", "7.5"), ("seed", "-1 for a random one")):
        if getattr(request, name) in (None, ""):  # an emptied field is a mistake, never a silent default
            raise UserError(f"{name} is empty: enter a number (e.g. {example})")
    guidance = float(request.guidance)
    if not math.isfinite(guidance) or not 0 <= guidance <= 100:
        raise UserError(f"guidance {request.guidance}: use a number from 0 to 100 (e.g. 7.5)")
    params = GenerationParams(
        prompt=(request.prompt or UPSCALE_PROMPT) if upscaling else request.prompt,
        negative_prompt=request.negative_prompt or "",
        width=None if upscaling else whole(request.width, "width"),
        height=None if upscaling else whole(request.height, "height"),
        steps=whole(request.steps, "steps") or 0,
        guidance=guidance,
        seed=whole(request.seed, "seed") or 0,
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
    return params


def batch_seeds(seed: Any, count: Any) -> list[int]:
    """The seeds of a batch of ``count`` images: ``seed``, ``seed`` + 1 ... (-1: a random seed for each)."""
    number = whole(count, "batch count")
    if number is None:
        raise UserError(f"batch count is empty: enter a number from 1 to {MAX_BATCH}")
    if not 1 <= number <= MAX_BATCH:
        raise UserError(f"batch count {number}: enter a number from 1 to {MAX_BATCH}")
    first = whole(seed, "seed")
    if first is None or first == -1:
        return [-1] * number
    return [first + index for index in range(number)]


def upscale_request_params(
    request: UpscaleRequest, params: GenerationParams, size: tuple[int, int]
) -> GenerationParams:
    """``params`` with the size, mode and prompt of enlarging an upload of ``size`` by the request's scale."""
    scale = float(request.scale or 0)
    if not math.isfinite(scale) or scale > MAX_SIDE:
        raise UserError(f"scale {request.scale}: enlarge by a number such as 2 or 4")
    if scale <= 1 or math.isclose(scale, 1.0):
        raise UserError(f"scale {request.scale}: enlarge by more than 1 (e.g. 2)")
    enlarged = upscale_params(params, size, scale)
    if max(enlarged.width or 0, enlarged.height or 0) > MAX_SIDE:
        raise UserError(
            f"{size[0]}x{size[1]} x {request.scale} is larger than this page accepts ({MAX_SIDE} px)"
        )
    return enlarged


__all__ = [
    "MAX_BATCH",
    "MAX_SIDE",
    "MODE_LABELS",
    "UPSCALE_MODES",
    "JobSettings",
    "Request",
    "TextToImageRequest",
    "UpscaleRequest",
    "batch_seeds",
    "budget_bytes",
    "request_params",
    "upscale_request_params",
    "whole",
]
