"""The VAE latent of an image, scaled as the pipeline's denoiser (UNet or transformer) expects it.

What every refine step starts from (DemoFusion's stages, a DiT's image-to-image).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import nn

from ..model import denoiser_of
from ..patches.base import Patch


def encode_image(pipe: Any, image: Image.Image) -> torch.Tensor:
    """The scaled latent of ``image`` (the posterior's mode), as the pipeline's denoiser expects it."""
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image).to(pipe._execution_device)
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dtype = torch.float32 if upcast else vae.dtype
    with torch.no_grad(), _vae_in_dtype(vae, dtype):
        latents = vae.encode(pixels.to(dtype)).latent_dist.mode()
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        latents = (latents - mean) * vae.config.scaling_factor / std
    else:
        latents = latents * vae.config.scaling_factor
    return latents.to(denoiser_of(pipe).dtype)


def _vae_in_dtype(vae: nn.Module, dtype: torch.dtype) -> Patch:
    """The VAE cast to ``dtype`` (SD-XL's VAE encodes in fp32); ``remove()`` casts it back."""
    original = vae.dtype
    if original == dtype:
        return Patch(f"VAE already in {dtype}")
    vae.to(dtype)
    return Patch(f"VAE in {dtype}", [lambda: vae.to(original)])


__all__ = ["encode_image"]
