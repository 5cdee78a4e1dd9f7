"""Full-size SD-1.5 and SD-XL pipelines with random weights: timings and memory at 4K-16K without downloads.

Built directly on the requested device (``meta`` gives the structure without memory, for planning).
The tokenizers are the offline byte-level ones, so prompts are spelled out character by character:
fine for timing and memory, meaningless for images.
"""

from __future__ import annotations

from typing import Any

import torch

from ..registry import CLIP_BIG_G, CLIP_L, SD_VAE_CONFIG, UNET_CONFIGS
from .tokenizer import byte_level_clip_tokenizer

FAMILIES = ("sd15", "sdxl")


def random_full_size_pipeline(family: str, dtype: torch.dtype, device: torch.device | str) -> Any:
    """An SD-1.5 (``"sd15"``) or SD-XL (``"sdxl"``) pipeline of full size with random weights."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
    tokenizer = byte_level_clip_tokenizer(model_max_length=77)

    def clip(size: dict[str, int], projection: bool) -> Any:
        config = CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=size["hidden_size"], bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **size,
        )  # fmt: skip
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIGS[family])
        if family == "sd15":
            vae = AutoencoderKL(**SD_VAE_CONFIG, sample_size=512, scaling_factor=0.18215)
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=clip(CLIP_L, False), tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )  # fmt: skip
        else:
            vae = AutoencoderKL(**SD_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=False)
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=clip(CLIP_L, False), text_encoder_2=clip(CLIP_BIG_G, True),
                tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
            )  # fmt: skip
    return pipe.to(dtype=dtype)


__all__ = ["FAMILIES", "random_full_size_pipeline"]
