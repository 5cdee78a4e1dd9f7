"""Preparing a run: one request becomes a :class:`RunPlan` (stages, VAE kernel, memory plan, seed, outputs).

Every front door (``linfusion generate`` / ``upscale``, ``linfusion plan``, the web UI) calls
:func:`prepare` (or :func:`prepare_steps`, which reports each stage before planning it) and then, to run,
:func:`linfusion.app.execute.execute`. So the stages, the VAE attention choice, the memory budgets' defaults
and the seed are decided here and nowhere else. ``model`` is a loaded pipeline or its structure on ``meta``
(:func:`~linfusion.app.loading.load_structure`): only configs and parameter sizes are read.

The defaults, one definition each:

- device budget (:attr:`Budgets.device` None): the device's free memory plus the weights already on it
  (:meth:`linfusion.planner.MemoryPlanner.plan`);
- host budget (:attr:`Budgets.host` None): :func:`default_host_budget`, this machine's available memory when
  the device is a GPU (on the CPU the device budget is the host's);
- UNet calls per stage: :func:`linfusion.pipelines.chain.unet_calls` (the FLOPs and predicted times);
- seed: :meth:`GenerationParams.with_seed` draws one for ``seed=-1``; any seed below
  :data:`~linfusion.app.params.SEED_LIMIT` is accepted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..choices import BUNDLED_MODEL_NAME, SIZE_MULTIPLE
from ..model import denoiser_of
from ..patches.base import Patch
from ..patches.vae_attention import apply_vae_attention
from ..pipelines.chain import Stage, minimum_side, native_long_side, plan_stages, unet_calls
from ..pipelines.demofusion import DEMOFUSION_ON_DIT
from ..pipelines.dit import max_sequence_length
from ..pipelines.upscale import upscale_target
from ..planner import (
    MAX_PLANNED_PIXELS,
    MemoryBudgetError,
    MemoryPlan,
    MemoryPlanner,
    available_memory,
    refusal,
)
from ..registry import is_dit, is_sdxl
from ..tiled_vae import attention_flops
from ..vae_attention import (
    QUADRATIC_HINT_TOKENS,
    mid_block_tokens,
    quadratic_attention_hint,
    vae_attention_mode,
)
from .loading import LINEAR_VAE_ATTENTION_MEASURED, auto_vae_attention
from .params import GenerationError, GenerationParams, minimum_side_message
from .timing import describe_duration, predicted_seconds

UPSCALE_PROMPT = "high quality, detailed"  # what an upscale without a prompt asks for


def default_host_budget(device: torch.device) -> int | None:
    """The host budget of a run without one: this machine's available memory when the device is a GPU;
    None on the CPU, where the device budget already bounds the host."""
    return available_memory(torch.device("cpu")) if device.type != "cpu" else None


@dataclass(frozen=True)
class Budgets:
    """The memory a run may use, in bytes (parsed where the user typed them)."""

    device: int | None = None  # None: the device's free memory (plus the weights on it)
    host: int | None = None  # None: default_host_budget(device)


@dataclass(frozen=True)
class RunPlan:
    """Everything decided before the first step: what :func:`~linfusion.app.execute.execute` runs."""

    params: GenerationParams  # settled: model, size, seed and VAE attention as the PNG records them
    stages: tuple[Stage, ...]
    unet_calls: tuple[int, ...]  # per stage: denoising steps, twice with DemoFusion's dilated branch
    memory: MemoryPlan  # one rank's (its stripe of every stage) when ``stripes`` > 1
    source: Image.Image | None = None  # the image a super-resolution enlarges
    out: Path | None = None  # the PNG to write (None: the caller saves the image)
    save_stages: Path | None = None  # folder for every stage's image
    notes: tuple[
        str, ...
    ] = ()  # what the user should know (VAE attention choice, hints); shown by the caller
    stripes: int = 1  # processes sharing each stage

    @property
    def vae_attention(self) -> str:
        return self.params.vae_attention


@dataclass(frozen=True)
class StageProgress:
    """What :func:`prepare_steps` reports before planning a stage's memory (``index`` from 0, of ``count``)."""

    index: int
    count: int
    stage: Stage


def upscale_params(params: GenerationParams, size: tuple[int, int], scale: float) -> GenerationParams:
    """``params`` for enlarging an image of ``size`` by ``scale``: its target size, a chain mode, a prompt."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise GenerationError(f"--scale must be a number > 1; got {scale!r}")
    try:
        width, height = upscale_target(size, scale)
    except ValueError as error:
        raise GenerationError(str(error)) from error
    return params.replace(
        prompt=params.prompt or UPSCALE_PROMPT,
        mode=params.mode if params.mode == "demofusion" else "sdedit",
        width=width,
        height=height,
    )


def stages_for(model: Any, params: GenerationParams, source: Image.Image | None = None) -> list[Stage]:
    """The stages ``params`` runs on ``model``: one for plain mode, else a chain (from ``source`` when given).

    Computed once per run (the chain recipes take them as they are).
    """
    if params.width is None or params.height is None:
        raise ValueError("settle the size first (prepare fills in the native size)")
    if params.mode == "plain":
        return [Stage(params.width, params.height, None)]
    sdxl = is_sdxl(model) or params.mode == "demofusion"  # DemoFusion: the SD-XL strengths
    start = source.size if source is not None else None
    stages = plan_stages(params.width, params.height, native_long_side(model), sdxl=sdxl, start=start)
    if not stages:
        assert source is not None  # a chain from the native size always has its base stage
        raise GenerationError(
            f"enlarging {source.width}x{source.height} gives {params.width}x{params.height} once rounded to "
            f"multiples of {SIZE_MULTIPLE}, no larger than the image: nothing to do; use a larger --scale"
        )
    return stages


def choose_vae_attention(
    params: GenerationParams, vae: Any, stages: Sequence[Stage], device: torch.device, dtype: torch.dtype
) -> tuple[str, list[str]]:
    """The VAE mid-block kernel for these stages (``auto`` settled) and the notes the user should see.

    Exact while its mid-block attends over fewer than ``QUADRATIC_HINT_TOKENS`` tokens; beyond, linear when
    its fidelity on this VAE is measured (:data:`LINEAR_VAE_ATTENTION_MEASURED`), else exact with a warning
    that gives the predicted time of the attention and the flag to pass.
    """
    if params.vae_attention != "auto":
        hint = quadratic_attention_hint(vae, [stage.size for stage in stages])
        return params.vae_attention, [hint] if hint else []
    width, height = max((stage.size for stage in stages), key=lambda size: size[0] * size[1])
    tokens = mid_block_tokens(vae, width, height)
    mode = auto_vae_attention(params.model, tokens)
    if tokens < QUADRATIC_HINT_TOKENS:
        return mode, []
    if mode == "linear":
        measured = LINEAR_VAE_ATTENTION_MEASURED[params.model or ""]
        return mode, [
            f"note: VAE attention linear ({tokens:,} mid-block tokens; measured on this VAE: {measured})"
        ]
    channels = vae.config.block_out_channels[-1]
    flops = sum(  # decoded once per stage, encoded too when the stage refines an image
        attention_flops(1, mid_block_tokens(vae, *stage.size), channels, "exact")
        * (2 if stage.strength is not None else 1)
        for stage in stages
    )
    seconds = predicted_seconds(flops, device, dtype)
    when = f", predicted about {describe_duration(seconds)} here" if seconds is not None else ""
    return mode, [
        f"warning: the VAE's mid-block softmax attention attends over {tokens:,} tokens at {width}x{height} "
        f"({flops:.2g} FLOPs{when}); --vae-attention linear makes it linear, a close approximation whose "
        "fidelity on this VAE is not measured (measure it with linfusion.patches.vae_attention.measure_vae_attention)"
    ]


def prompt_length_notes(model: Any, params: GenerationParams) -> list[str]:
    """One note per prompt longer than the text encoder reads, saying how many tokens it drops.

    diffusers cuts such a prompt with a warning hidden among third-party notices; the user should know.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if not callable(tokenizer):  # a structure on meta carries the length only
        return []
    transformer = getattr(model, "transformer", None)  # a DiT reads its pipeline's T5 length
    limit = max_sequence_length(model) if is_dit(transformer) else tokenizer.model_max_length
    notes = []
    for what, text in (("prompt", params.prompt), ("negative prompt", params.negative_prompt)):
        if not text:
            continue
        tokens = len(tokenizer(text, truncation=False, verbose=False).input_ids)
        if tokens > limit:
            notes.append(
                f"note: the {what} is {tokens:,} tokens and the text encoder reads {limit}: "
                f"its last {tokens - limit:,} tokens are dropped"
            )
    return notes


def stripe_sizes(model: Any, stages: Sequence[Stage], stripes: int) -> list[tuple[int, int]]:
    """The size one rank plans per stage: the whole stage, or with ``stripes`` > 1 the tallest stripe."""
    if stripes == 1:
        return [stage.size for stage in stages]
    from ..parallel.layout import StripeLayoutError, stripe_bounds

    factor = model.vae_scale_factor
    denoiser = denoiser_of(model)  # a transformer's stripes start on whole patches, a UNet's on whole rows
    depth = 2 ** (len(denoiser.config.get("block_out_channels", ())) - 1)  # ... of its deepest level
    multiple = denoiser.config.patch_size if is_dit(denoiser) else depth
    sizes = []
    for stage in stages:
        try:
            bounds = stripe_bounds(stage.height // factor, stripes, multiple)
        except StripeLayoutError as error:
            raise GenerationError(str(error)) from error
        sizes.append((stage.width, max(stop - start for start, stop in bounds) * factor))
    return sizes


def memory_plan_steps(
    planner: MemoryPlanner,
    sizes: Sequence[tuple[int, int]],
    budgets: Budgets,
    guidance: float,
    encodes: Sequence[bool],
    calls: Sequence[int],
    refuse: bool = True,
) -> Iterator[int | MemoryPlan]:
    """Plan the stages one at a time: yields each stage's index before planning it, then the plan.

    With ``refuse``, a plan that cannot fit raises :class:`GenerationError` naming the smallest budgets,
    before anything runs (a stage beyond ``MAX_PLANNED_PIXELS`` is refused without a trace when no saver
    can bring it within the budgets).
    """
    budget = budgets.device
    host = budgets.host if budgets.host is not None else default_host_budget(planner.device)
    planned = []
    for index, (size, encode, call_count) in enumerate(zip(sizes, encodes, calls)):
        yield index
        try:
            one = planner.plan(
                [size],
                budget=budget,  # None: the free memory, read once (at the first stage)
                guidance=guidance > 1.0,
                encodes=[encode],
                host_budget=host,
                unet_calls=[call_count],
                refuse=refuse and size[0] * size[1] > MAX_PLANNED_PIXELS,
            )
        except MemoryBudgetError as error:
            raise GenerationError(str(error)) from error
        budget = one.budget
        planned.extend(one.stages)
    plan = MemoryPlan(budget, planner.device, tuple(planned), one.host_budget)
    if refuse and not plan.fits:
        raise GenerationError(refusal(plan))
    yield plan


def plan_memory(
    planner: MemoryPlanner, stages: Sequence[Stage], budgets: Budgets, guidance: float, steps: int, mode: str
) -> MemoryPlan:
    """The memory plan of these stages, or a :class:`GenerationError` naming the smallest budgets."""
    calls = [unet_calls(stage, steps, mode) for stage in stages]
    encodes = [stage.strength is not None for stage in stages]
    *_, plan = memory_plan_steps(planner, [s.size for s in stages], budgets, guidance, encodes, calls)
    assert isinstance(plan, MemoryPlan)
    return plan


def prepare_steps(
    params: GenerationParams,
    model: Any,
    budgets: Budgets = Budgets(),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    source: Image.Image | None = None,
    out: str | Path | None = None,
    save_stages: str | Path | None = None,
    planner: MemoryPlanner | None = None,
    patch: Patch | None = None,
    refuse: bool = True,
    stripes: int = 1,
) -> Iterator[StageProgress | RunPlan]:
    """:func:`prepare`, reporting each stage before its memory is planned (a :class:`StageProgress`), then
    the :class:`RunPlan`.

    A caller that stops iterating stops the planning between two stages.
    """
    params = params.replace(model=params.model or BUNDLED_MODEL_NAME)
    native = native_long_side(model)  # only a missing size means the native one (0 is refused)
    params = params.replace(
        width=native if params.width is None else params.width,
        height=native if params.height is None else params.height,
    )
    smallest = minimum_side(model)
    params.validate(minimum_side=smallest)
    if params.mode == "demofusion" and is_dit(denoiser_of(model)):
        raise GenerationError(DEMOFUSION_ON_DIT)
    if source is not None and min(source.size) < smallest:
        what = f"the image ({source.width}x{source.height})"
        raise GenerationError(minimum_side_message(what, smallest))
    params = params.with_seed()
    stages = stages_for(model, params, source)
    planner = planner or MemoryPlanner(model, device=device, dtype=dtype)
    vae_attention, notes = choose_vae_attention(params, model.vae, stages, planner.device, planner.dtype)
    notes = prompt_length_notes(model, params) + notes
    if vae_attention_mode(model.vae) != vae_attention:  # the planner reads the kernel the VAE runs
        applied = apply_vae_attention(model.vae, vae_attention)
        if patch is not None:
            patch.add(applied)
    calls = [unet_calls(stage, params.steps, params.mode) for stage in stages]
    encodes = [stage.strength is not None for stage in stages]
    sizes = stripe_sizes(model, stages, stripes)
    for item in memory_plan_steps(planner, sizes, budgets, params.guidance, encodes, calls, refuse):
        if isinstance(item, int):
            yield StageProgress(item, len(stages), stages[item])
            continue
        yield RunPlan(
            params.replace(vae_attention=vae_attention),
            tuple(stages),
            tuple(calls),
            item,
            source=source,
            out=Path(out) if out is not None else None,
            save_stages=Path(save_stages) if save_stages is not None else None,
            notes=tuple(notes),
            stripes=stripes,
        )


def prepare(params: GenerationParams, model: Any, budgets: Budgets = Budgets(), **options: Any) -> RunPlan:
    """The :class:`RunPlan` of ``params`` on ``model`` (options as :func:`prepare_steps`).

    Fills in the native size, checks the request against the model, draws the seed, computes the stages
    once, settles the VAE attention (applied to ``model.vae``; recorded in ``patch`` when given, so the
    caller can undo it) and plans the memory for ``budgets``.
    """
    *_, run = prepare_steps(params, model, budgets, **options)
    assert isinstance(run, RunPlan)
    return run


__all__ = [
    "UPSCALE_PROMPT",
    "Budgets",
    "RunPlan",
    "StageProgress",
    "choose_vae_attention",
    "default_host_budget",
    "memory_plan_steps",
    "plan_memory",
    "prepare",
    "prepare_steps",
    "prompt_length_notes",
    "stages_for",
    "stripe_sizes",
    "upscale_params",
]
