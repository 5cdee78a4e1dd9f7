"""Text-to-image and image-to-image steps on diffusion-transformer (PixArt) pipelines.

diffusers' PixArt pipelines have no image-to-image sibling and no ``callback_on_step_end`` (only the older
``callback``, which cannot change the latents), so the denoising loop of a PixArt pipeline is run here:
the same prompt encoding, micro-conditions, classifier-free guidance, learned-sigma split and scheduler
steps as ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline.__call__``, from any starting latents and any tail
of the schedule. Text-to-image from the pipeline's noise gives the pipeline's own image; a refine step
encodes an image with the VAE, noises it to the stage's strength (the tail of the timesteps, as diffusers'
img2img pipelines take it) and denoises from there, so the stage chains (SDEdit) run on PixArt with the
callbacks the Stable Diffusion pipelines call (progress, previews, cancelling).

Sizes are exact: no resolution binning (which would snap the size to PixArt's aspect-ratio table). The
positional embedding above the native size is the transformer's own: it is computed for the latent grid at
run time with the trained ``interpolation_scale`` (see docs/high-resolution.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..model import denoiser_of
from ..patches.stage import cpu_encode_dtype
from ..registry import max_sequence_length
from .latents import encode_image


@dataclass(frozen=True)
class DiTConditioning:
    """What every transformer call of one image takes besides the latents and the timestep."""

    embeds: torch.Tensor  # [negative; positive] T5 states with guidance, else the positive ones
    mask: torch.Tensor  # their attention mask (T5 pads to max_sequence_length)
    added_cond_kwargs: dict[str, torch.Tensor | None]  # PixArt-Alpha's resolution/aspect micro-conditions
    guidance_scale: float

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


class RunningPipeline:
    """The pipeline as step callbacks see it: ``num_timesteps`` of the running loop, the rest the pipeline's.

    diffusers' Stable Diffusion pipelines expose ``num_timesteps`` while they run; PixArt's do not.
    """

    def __init__(self, pipe: Any, num_timesteps: int) -> None:
        self.pipe = pipe
        self.num_timesteps = num_timesteps

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)


def text_encoder_device(pipe: Any) -> torch.device:
    """Where the prompt is encoded: the execution device while the text encoder is under accelerate's
    offload hooks (which bring it there), else wherever the text encoder is."""
    encoder = pipe.text_encoder
    if getattr(encoder, "_hf_hook", None) is not None:
        return pipe._execution_device
    return encoder.device


@contextlib.contextmanager
def float32_while_on_cpu(module: torch.nn.Module) -> Iterator[None]:
    """Hold ``module``'s tensors in :func:`~linfusion.patches.stage.cpu_encode_dtype` meanwhile (float32 for
    float16), then put the very same values back: float16 -> float32 -> float16 is exact, so the encode
    differs from a float16 one only by float32's finer rounding. Other dtypes are left as they are."""
    changed = [
        (t, t.dtype)
        for t in (*module.parameters(), *module.buffers())
        if cpu_encode_dtype(t.dtype) != t.dtype
    ]
    for tensor, dtype in changed:
        tensor.data = tensor.data.to(cpu_encode_dtype(dtype))
    try:
        yield
    finally:
        for tensor, dtype in changed:
            tensor.data = tensor.data.to(dtype)


def encode_conditioning(
    pipe: Any, prompt: str, negative_prompt: str | None, guidance_scale: float, width: int, height: int
) -> DiTConditioning:
    """The prompt's T5 states (and the negative prompt's, under guidance) and the micro-conditions.

    The prompt is encoded where the text encoder is (:func:`text_encoder_device`: the CPU when the plan
    keeps T5 there) and its states and mask are moved to the execution device.
    """
    device = pipe._execution_device
    guided = guidance_scale > 1.0
    text_device = text_encoder_device(pipe)
    dtype = pipe.text_encoder.dtype
    on_host = text_device.type == "cpu" and torch.device(device).type != "cpu"
    with float32_while_on_cpu(pipe.text_encoder) if on_host else contextlib.nullcontext():
        embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
            prompt,
            guided,
            negative_prompt=negative_prompt or "",
            device=text_device,
            clean_caption=False,
            max_sequence_length=max_sequence_length(pipe),
        )
    embeds, mask = embeds.to(device, dtype), mask.to(device)
    if guided:
        negative_embeds, negative_mask = negative_embeds.to(device, dtype), negative_mask.to(device)
    if guided:
        embeds, mask = torch.cat([negative_embeds, embeds]), torch.cat([negative_mask, mask])
    added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
    if denoiser_of(pipe).config.sample_size == 128:  # as PixArt-Alpha's pipeline decides it
        batch = embeds.shape[0]
        resolution = torch.tensor([[height, width]], dtype=embeds.dtype, device=device).repeat(batch, 1)
        aspect = torch.tensor([[float(height / width)]], dtype=embeds.dtype, device=device).repeat(batch, 1)
        added = {"resolution": resolution, "aspect_ratio": aspect}
    return DiTConditioning(embeds, mask, added, guidance_scale)


def denoise(
    pipe: Any,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    conditioning: DiTConditioning,
    generator: torch.Generator | None = None,
    callback_on_step_end: Callable | None = None,
) -> torch.Tensor:
    """Run the scheduler (already set) over ``timesteps`` from ``latents``, as PixArt's pipelines do.

    After each step ``callback_on_step_end(pipe, index, timestep, {"latents": ...})`` is called as diffusers'
    pipelines call it; the latents it returns replace the step's.
    """
    transformer, scheduler = pipe.transformer, pipe.scheduler
    extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
    learned_sigma = transformer.config.out_channels // 2 == latents.shape[1]
    running = RunningPipeline(pipe, len(timesteps))
    with pipe.progress_bar(total=len(timesteps)) as progress:
        for index, timestep in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if conditioning.guided else latents
            model_input = scheduler.scale_model_input(model_input, timestep)
            current = torch.as_tensor(timestep, device=model_input.device)
            current = current.reshape(1).expand(model_input.shape[0])
            prediction = transformer(
                model_input,
                encoder_hidden_states=conditioning.embeds,
                encoder_attention_mask=conditioning.mask,
                timestep=current,
                added_cond_kwargs=conditioning.added_cond_kwargs,
                return_dict=False,
            )[0]
            if conditioning.guided:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + conditioning.guidance_scale * (conditional - unconditional)
            if learned_sigma:
                prediction = prediction.chunk(2, dim=1)[0]
            latents = scheduler.step(prediction, timestep, latents, **extra, return_dict=False)[0]
            if callback_on_step_end is not None:
                returned = callback_on_step_end(running, index, timestep, {"latents": latents}) or {}
                latents = returned.get("latents", latents)
            progress.update()
    return latents


def decode(pipe: Any, latents: torch.Tensor) -> Image.Image:
    """The image of ``latents`` (PixArt's VAE has no latent mean/std: the scaling factor alone)."""
    with torch.no_grad():
        pixels = pipe.vae.decode(
            latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False
        )
    return pipe.image_processor.postprocess(pixels[0], output_type="pil")[0]


def text_to_image(
    pipe: Any,
    prompt: str,
    width: int,
    height: int,
    negative_prompt: str | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.5,
    generator: torch.Generator | None = None,
    callback_on_step_end: Callable | None = None,
) -> Image.Image:
    """PixArt text-to-image at exactly ``width`` x ``height``: the pipeline's own image for the same seed."""
    with torch.no_grad():
        conditioning = encode_conditioning(pipe, prompt, negative_prompt, guidance_scale, width, height)
        pipe.scheduler.set_timesteps(num_inference_steps, device=pipe._execution_device)
        latents = pipe.prepare_latents(
            1,
            pipe.transformer.config.in_channels,
            height,
            width,
            conditioning.embeds.dtype,
            pipe._execution_device,
            generator,
        )
        latents = denoise(
            pipe, latents, pipe.scheduler.timesteps, conditioning, generator, callback_on_step_end
        )
    return decode(pipe, latents)


def refine_timesteps(scheduler: Any, num_inference_steps: int, strength: float, device: Any) -> torch.Tensor:
    """The tail of the schedule an image-to-image step of ``strength`` runs (as diffusers' img2img takes it)."""
    steps = min(int(num_inference_steps * strength), num_inference_steps)
    if steps < 1:
        raise ValueError(
            f"strength {strength} of {num_inference_steps} steps runs no step: ask for at least "
            f"{math.ceil(1 / strength)} steps"
        )
    scheduler.set_timesteps(num_inference_steps, device=device)
    start = max(num_inference_steps - steps, 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def refine_latents(
    pipe: Any,
    image_latents: torch.Tensor,
    prompt: str,
    strength: float,
    negative_prompt: str | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.5,
    generator: torch.Generator | None = None,
    callback_on_step_end: Callable | None = None,
) -> torch.Tensor:
    """Noise ``image_latents`` to ``strength`` with the pipeline's scheduler and denoise them back.

    The noise is the generator's next draw in the latents' shape (as text-to-image draws its latents).
    """
    from diffusers.utils.torch_utils import randn_tensor

    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1]; got {strength}")
    device = pipe._execution_device
    height, width = (side * pipe.vae_scale_factor for side in image_latents.shape[-2:])
    with torch.no_grad():
        conditioning = encode_conditioning(pipe, prompt, negative_prompt, guidance_scale, width, height)
        timesteps = refine_timesteps(pipe.scheduler, num_inference_steps, strength, device)
        image_latents = image_latents.to(device=device, dtype=conditioning.embeds.dtype)
        noise = randn_tensor(
            tuple(image_latents.shape), generator=generator, device=device, dtype=image_latents.dtype
        )
        latents = pipe.scheduler.add_noise(image_latents, noise, timesteps[:1])
        return denoise(pipe, latents, timesteps, conditioning, generator, callback_on_step_end)


def image_to_image(
    pipe: Any, image: Image.Image, prompt: str, strength: float, **options: Any
) -> Image.Image:
    """SDEdit on PixArt: ``image`` encoded by the VAE, noised to ``strength``, denoised (options: see
    :func:`refine_latents`)."""
    return decode(pipe, refine_latents(pipe, encode_image(pipe, image), prompt, strength, **options))


__all__ = [
    "DiTConditioning",
    "RunningPipeline",
    "decode",
    "denoise",
    "encode_conditioning",
    "image_to_image",
    "max_sequence_length",
    "refine_latents",
    "refine_timesteps",
    "text_encoder_device",
    "text_to_image",
]
