"""DemoFusion-style stages: SDEdit stages steered by a dilated global branch.

Each stage after the native-size base decodes the previous image, enlarges it, re-encodes it to ``z0``
and denoises from strength s (default ``linspace(0.32, 0, n + 1)``). At every step, with the cosine
factor ``cf = (1 + cos(pi (T - t) / T)) / 2`` (T = the scheduler's training steps):

- skip residual: the latent is pulled towards ``z0`` noised to the same step, weight ``c1 = cf^3``;
- the UNet runs twice: (a) plain on the full latent, (b) with every Conv2d's dilation and padding
  multiplied by the stage's scale on a Gaussian-blurred latent (kernel ``2 r - 1``, sigma ``0.8 c3``,
  ``c3 = 0.99 cf + 0.01``, renormalized to the latent's mean and std); the predictions blend as
  ``(1 - c2) a + c2 b`` with ``c2 = cf`` (:func:`linfusion.patches.dilation.apply_dilated_branch`).
  Branch (b) sees the layout at the scale the model was trained at, which keeps large images from
  repeating objects; with LinFusion both passes attend globally, so no patches are needed;
- the stage's final latent is renormalized to the anchor's per-channel mean and std (the base image's
  latent, or the input image's for super-resolution), which keeps colours from drifting.

Dilation and padding are restored after every dilated pass, also when the UNet raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..patches.dilation import COSINE_POWERS, DEFAULT_SIGMA, apply_dilated_branch, cosine_factor
from ..planner import MemoryPlan
from ..registry import is_dit
from .chain import DEFAULT_TILE_FROM, Stage, StageCallback, chain_stages, run_chain, stage_steps
from .latents import encode_image

# Why a diffusion transformer gets no DemoFusion: its global branch is the dilation of the UNet's convolutions.
DEMOFUSION_ON_DIT = (
    "--mode demofusion steers every stage with a dilated copy of the UNet's convolutions (its global branch); "
    "a diffusion transformer (PixArt) has no convolution between its patch embedding and its output to "
    "dilate, and with LinFusion every token already attends to the whole image: use --mode sdedit (the same "
    "stages without the dilated branch)"
)


def match_channel_statistics(latents: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``latents`` with each channel's mean and std set to the anchor's (computed in fp32)."""
    x, a = latents.float(), anchor.float()
    dims = (-2, -1)
    x = (x - x.mean(dim=dims, keepdim=True)) / x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return (x * a.std(dim=dims, keepdim=True) + a.mean(dim=dims, keepdim=True)).to(latents.dtype)


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


class DemoFusionSteps:
    """The DemoFusion recipe; keeps the anchor latent (base image, or input image) across stages."""

    def __init__(
        self, pipe: Any, common: dict[str, Any], num_inference_steps: int, sigma: float, user_callback: Any
    ) -> None:
        self.pipe = pipe
        self.common = common
        self.num_inference_steps = num_inference_steps
        self.sigma = sigma
        self.user_callback = user_callback
        self.anchor: torch.Tensor | None = None
        self.base_size: tuple[int, int] | None = None

    def base(self, pipe: Any, stage: Stage) -> Image.Image:
        store: dict[str, torch.Tensor] = {}
        image = pipe(
            width=stage.width,
            height=stage.height,
            num_inference_steps=self.num_inference_steps,
            callback_on_step_end=_capture_latents(store, self.user_callback),
            **self.common,
        ).images[0]
        self.anchor, self.base_size = store["latents"], stage.size
        return image

    def refine(self, img2img: Any, stage: Stage, previous: Image.Image, resized: Image.Image) -> Image.Image:
        assert stage.strength is not None
        if self.anchor is None:  # super-resolution: the input image is the anchor
            self.anchor, self.base_size = encode_image(self.pipe, previous), previous.size
        assert self.base_size is not None
        z0 = encode_image(self.pipe, resized)
        noise = _pipeline_noise(self.common["generator"], z0)
        train_steps = self.pipe.scheduler.config.num_train_timesteps
        scale = stage_scale(stage.size, self.base_size)
        with apply_dilated_branch(self.pipe.unet, scale, self.sigma, train_steps):
            return img2img(
                image=z0,
                strength=stage.strength,
                num_inference_steps=stage_steps(self.num_inference_steps, stage.strength),
                callback_on_step_end=_stage_callback(z0, noise, self.anchor, self.user_callback),
                **self.common,
            ).images[0]


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
    exact_vae_tiling_from: int | None = DEFAULT_TILE_FROM,
    memory_plan: MemoryPlan | None = None,
    on_stage_end: StageCallback | None = None,
    stage_plan: Sequence[Stage] | None = None,
    **pipeline_kwargs: Any,
) -> Image.Image:
    """Generate (or, with ``image``, enlarge) an image of ``width`` x ``height`` by DemoFusion stages.

    Works with SD-1.x/2.x and SD-XL text-to-image pipelines (the SD-XL recipe; strengths default to
    ``linspace(0.32, 0, n + 1)`` for every family). Arguments as :func:`linfusion.pipelines.sdedit`;
    ``sigma`` scales the blur of the dilated branch. Schedulers of order 1 only (DDIM, Euler, DPM++ ...).
    """
    if is_dit(pipe):
        raise ValueError(DEMOFUSION_ON_DIT)
    if isinstance(generator, list):
        raise ValueError("demofusion takes one torch.Generator, not a list")
    if getattr(pipe.scheduler, "order", 1) != 1:
        raise ValueError(
            f"{type(pipe.scheduler).__name__} takes {pipe.scheduler.order} model calls per step; "
            "demofusion needs a first-order scheduler (ddim, euler, euler-a, dpm++, unipc ...)"
        )
    generator = generator or torch.Generator(pipe._execution_device).manual_seed(int(torch.seed() % 2**63))
    plan = (
        list(stage_plan)
        if stage_plan is not None
        else chain_stages(pipe, width, height, image, stages, strengths, base_long_side, sdxl=True)
    )
    common = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "guidance_scale": guidance_scale,
        "generator": generator,
        **pipeline_kwargs,
    }
    steps = DemoFusionSteps(pipe, common, num_inference_steps, sigma, callback_on_step_end)
    return run_chain(
        pipe,
        plan,
        steps,
        image=image,
        memory_plan=memory_plan,
        exact_vae_tiling_from=exact_vae_tiling_from,
        save_stages=save_stages,
        on_stage_end=on_stage_end,
    )


__all__ = [
    "DEMOFUSION_ON_DIT",
    "DemoFusionSteps",
    "demofusion",
    "match_channel_statistics",
    "stage_scale",
]
