"""DemoFusion-style stages (SPEC section 5): SDEdit stages steered by a dilated global branch.

Each stage after the native-size base decodes the previous image, enlarges it, re-encodes it to ``z0``
and denoises from strength s (default ``linspace(0.32, 0, n + 1)``). At every step, with the cosine
factor ``cf = (1 + cos(pi (T - t) / T)) / 2`` (T = the scheduler's training steps):

- skip residual: the latent is pulled towards ``z0`` noised to the same step, weight ``c1 = cf^3``;
- the UNet runs twice: (a) plain on the full latent, (b) with every Conv2d's dilation and padding
  multiplied by the stage's scale on a Gaussian-blurred latent (kernel ``2 r - 1``, sigma ``0.8 c3``,
  ``c3 = 0.99 cf + 0.01``, renormalized to the latent's mean and std); the predictions blend as
  ``(1 - c2) a + c2 b`` with ``c2 = cf``. Branch (b) sees the layout at the scale the model was trained
  at, which keeps large images from repeating objects; with LinFusion both passes attend globally, so no
  patches are needed;
- the stage's final latent is renormalized to the anchor's per-channel mean and std (the base image's
  latent, or the input image's for super-resolution), which keeps colours from drifting.

Dilation and padding are restored after every dilated pass, also when the UNet raises.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .sdedit import Stage, _with_progress_desc, chain_plan, finish_stage, stage_memory, stage_steps

DEFAULT_SIGMA = 0.8
COSINE_POWERS = (3.0, 1.0, 1.0)  # c1 (skip residual), c2 (dilated branch), c3 (blur width)


def cosine_factor(timestep: float | torch.Tensor, train_steps: int = 1000) -> float:
    """``(1 + cos(pi (T - t) / T)) / 2``: 1 at the noisiest step, 0 at the cleanest."""
    t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
    return 0.5 * (1.0 + math.cos(math.pi * (train_steps - t) / train_steps))


@contextlib.contextmanager
def dilated_convolutions(model: nn.Module, scale: int) -> Iterator[nn.Module]:
    """Multiply every Conv2d's dilation and padding by ``scale``; restored on exit, also on error.

    Output sizes are unchanged (kernel ``k``, padding ``p = (k - 1) / 2``: dilation ``s`` with padding
    ``s p`` covers the same rows), so the UNet runs as usual with a receptive field ``scale`` times wider.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1; got {scale}")
    saved: list[tuple[nn.Conv2d, tuple[int, ...], Any]] = []
    try:
        for module in model.modules():
            if not isinstance(module, nn.Conv2d) or module.kernel_size == (1, 1):
                continue
            if isinstance(module.padding, str):
                raise ValueError(f"cannot dilate a convolution with padding={module.padding!r}")
            saved.append((module, module.dilation, module.padding))
            module.dilation = tuple(d * scale for d in module.dilation)
            module.padding = tuple(p * scale for p in module.padding)
        yield model
    finally:
        for module, dilation, padding in saved:
            module.dilation, module.padding = dilation, padding


def gaussian_blur(latents: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Per-channel Gaussian blur (reflect padding), renormalized to each sample's mean and std."""
    if kernel_size <= 1 or sigma <= 0:
        return latents
    radius = kernel_size // 2
    offsets = torch.arange(kernel_size, device=latents.device, dtype=torch.float32) - radius
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = (weights / weights.sum()).to(latents.dtype)
    channels = latents.shape[1]
    x = F.pad(latents, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, weights.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    x = F.conv2d(x, weights.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    dims = tuple(range(1, latents.ndim))
    mean, std = latents.mean(dim=dims, keepdim=True), latents.std(dim=dims, keepdim=True)
    blurred_mean, blurred_std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True)
    return (x - blurred_mean) / blurred_std.clamp_min(1e-6) * std + mean


def match_channel_statistics(latents: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``latents`` with each channel's mean and std set to the anchor's (computed in fp32)."""
    x, a = latents.float(), anchor.float()
    dims = (-2, -1)
    x = (x - x.mean(dim=dims, keepdim=True)) / x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return (x * a.std(dim=dims, keepdim=True) + a.mean(dim=dims, keepdim=True)).to(latents.dtype)


def _sample_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


@contextlib.contextmanager
def dilated_branch(
    unet: nn.Module, scale: int, sigma: float = DEFAULT_SIGMA, train_steps: int = 1000
) -> Iterator[None]:
    """Every UNet call returns ``(1 - c2) plain + c2 dilated-on-blurred`` (module docstring).

    Built from hooks that run outside any other hook on the UNet: the blur and its statistics see the
    whole latent even when spatial parallelism (:mod:`linfusion.parallel`) splits every UNet call into
    stripes, and the second, dilated pass is an ordinary UNet call that is split the same way.
    """
    if scale < 2:  # dilation 1 and a 1-tap blur: the branch is the plain pass
        yield
        return
    state: dict[str, Any] = {"inner": False, "call": None}

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not state["inner"]:
            state["call"] = (args, kwargs)

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if state["inner"] or state["call"] is None:
            return output
        call_args, call_kwargs = state["call"]
        state["call"] = None
        sample = call_args[0] if call_args else call_kwargs["sample"]
        timestep = call_args[1] if len(call_args) > 1 else call_kwargs["timestep"]
        factor = cosine_factor(timestep, train_steps)
        c2 = factor ** COSINE_POWERS[1]
        c3 = 0.99 * factor ** COSINE_POWERS[2] + 0.01
        blurred = gaussian_blur(sample, 2 * scale - 1, sigma * c3)
        if call_args:
            call_args = (blurred, *call_args[1:])
        else:
            call_kwargs = {**call_kwargs, "sample": blurred}
        state["inner"] = True
        try:
            with dilated_convolutions(unet, scale):
                dilated = _sample_of(unet(*call_args, **call_kwargs))
        finally:
            state["inner"] = False
        mixed = _sample_of(output) * (1.0 - c2) + dilated * c2
        if isinstance(output, tuple):
            return (mixed, *output[1:])
        output.sample = mixed
        return output

    handles = [
        unet.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
        unet.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def encode_image(pipe: Any, image: Image.Image) -> torch.Tensor:
    """The scaled latent of ``image`` (the posterior's mode), as the pipeline's UNet expects it."""
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image).to(pipe._execution_device)
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dtype = torch.float32 if upcast else vae.dtype
    with torch.no_grad(), _vae_dtype(vae, dtype):
        latents = vae.encode(pixels.to(dtype)).latent_dist.mode()
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        latents = (latents - mean) * vae.config.scaling_factor / std
    else:
        latents = latents * vae.config.scaling_factor
    return latents.to(pipe.unet.dtype)


@contextlib.contextmanager
def _vae_dtype(vae: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    original = vae.dtype
    if original == dtype:
        yield
        return
    vae.to(dtype)
    try:
        yield
    finally:
        vae.to(original)


def _pipeline_noise(generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """The noise the img2img pipeline is about to draw from ``generator`` for a latent input (its first
    draw: no VAE sampling happens when the image is already a latent)."""
    from diffusers.utils.torch_utils import randn_tensor

    twin = torch.Generator(device=generator.device)
    twin.set_state(generator.get_state())
    return randn_tensor(tuple(like.shape), generator=twin, device=like.device, dtype=like.dtype)


def _stage_callback(
    z0: torch.Tensor,
    noise: torch.Tensor,
    anchor: torch.Tensor,
    user_callback: Callable | None,
) -> Callable:
    """After each step: the skip residual towards ``z0`` noised to the next step; after the last, the
    anchor renormalization; then the caller's own callback."""

    def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        latents = tensors["latents"]
        scheduler = pipe.scheduler
        steps = pipe.num_timesteps
        if index + 1 < steps:
            upcoming = scheduler.timesteps[len(scheduler.timesteps) - steps + index + 1]
            train_steps = scheduler.config.num_train_timesteps
            c1 = cosine_factor(upcoming, train_steps) ** COSINE_POWERS[0]
            noised = scheduler.add_noise(z0, noise, upcoming.reshape(1))
            latents = latents * (1.0 - c1) + noised.to(latents.dtype) * c1
        else:
            latents = match_channel_statistics(latents, anchor)
        tensors = {**tensors, "latents": latents}
        if user_callback is not None:
            tensors = {**tensors, **(user_callback(pipe, index, timestep, tensors) or {})}
        return tensors

    return on_step_end


def _capture_latents(store: dict[str, torch.Tensor], user_callback: Callable | None) -> Callable:
    def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if user_callback is not None:
            tensors = {**tensors, **(user_callback(pipe, index, timestep, tensors) or {})}
        if index + 1 == pipe.num_timesteps:
            store["latents"] = tensors["latents"].detach().clone()
        return tensors

    return on_step_end


def stage_scale(size: tuple[int, int], base: tuple[int, int]) -> int:
    """The dilation of a stage: how many base-size steps its long side spans (at least 1)."""
    return max(1, round(max(size) / max(base)))


def demofusion(
    pipe: Any,
    prompt: str,
    width: int,
    height: int,
    negative_prompt: str | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    image: Image.Image | None = None,
    stages: int | None = None,
    strengths: Sequence[float] | None = None,
    base_long_side: int | None = None,
    sigma: float = DEFAULT_SIGMA,
    save_stages: str | Path | None = None,
    callback_on_step_end: Callable | None = None,
    exact_vae_tiling_from: int | None = 2048 * 2048,
    memory_plan: Any = None,
    on_stage_end: Callable[[int, Stage, Image.Image], None] | None = None,
    **pipeline_kwargs: Any,
) -> Image.Image:
    """Generate (or, with ``image``, enlarge) an image of ``width`` x ``height`` by DemoFusion stages.

    Works with SD-1.x/2.x and SD-XL text-to-image pipelines (the SD-XL recipe; strengths default to
    ``linspace(0.32, 0, n + 1)`` for every family). Arguments as :func:`linfusion.pipelines.sdedit`;
    ``sigma`` scales the blur of the dilated branch. Schedulers of order 1 only (DDIM, Euler, DPM++ ...).
    """
    from diffusers import AutoPipelineForImage2Image

    if isinstance(generator, list):
        raise ValueError("demofusion takes one torch.Generator, not a list")
    if getattr(pipe.scheduler, "order", 1) != 1:
        raise ValueError(
            f"{type(pipe.scheduler).__name__} takes {pipe.scheduler.order} model calls per step; "
            "demofusion needs a first-order scheduler (ddim, euler, euler-a, dpm++, unipc ...)"
        )
    device = pipe._execution_device
    generator = generator or torch.Generator(device).manual_seed(int(torch.seed() % 2**63))
    plan, folder = chain_plan(
        pipe, width, height, image, stages, strengths, base_long_side, True, memory_plan, save_stages
    )
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    common = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "guidance_scale": guidance_scale,
        "generator": generator,
        **pipeline_kwargs,
    }
    current = image.convert("RGB") if image is not None else None
    anchor: torch.Tensor | None = None
    base_size = current.size if current is not None else (plan[0].width, plan[0].height)
    for index, stage in enumerate(plan):
        label = f"stage {index + 1}/{len(plan)} {stage.width}x{stage.height}"
        savers = memory_plan.stages[index].savers if memory_plan is not None else None
        with stage_memory(pipe, savers, stage.width * stage.height, exact_vae_tiling_from):
            if anchor is None and current is not None:
                anchor = encode_image(pipe, current)
            if stage.strength is None:
                _with_progress_desc(pipe, label)
                store: dict[str, torch.Tensor] = {}
                current = pipe(
                    width=stage.width,
                    height=stage.height,
                    num_inference_steps=num_inference_steps,
                    callback_on_step_end=_capture_latents(store, callback_on_step_end),
                    **common,
                ).images[0]
                anchor = store["latents"]
            else:
                _with_progress_desc(img2img, label)
                resized = current.resize((stage.width, stage.height), Image.Resampling.LANCZOS)
                z0 = encode_image(pipe, resized)
                noise = _pipeline_noise(generator, z0)
                steps = stage_steps(num_inference_steps, stage.strength)
                scale = stage_scale((stage.width, stage.height), base_size)
                train_steps = pipe.scheduler.config.num_train_timesteps
                with dilated_branch(pipe.unet, scale, sigma, train_steps):
                    current = img2img(
                        image=z0,
                        strength=stage.strength,
                        num_inference_steps=steps,
                        callback_on_step_end=_stage_callback(z0, noise, anchor, callback_on_step_end),
                        **common,
                    ).images[0]
        finish_stage(index, stage, current, folder, on_stage_end)
    return current
