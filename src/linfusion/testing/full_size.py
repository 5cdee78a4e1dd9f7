"""Full-size SD-1.5, SD-XL, PixArt-Alpha and PixArt-Sigma pipelines with random weights: timings and memory
at 4K-16K without downloads.

Built directly on the requested device (``meta`` gives the structure without memory, for planning).
The tokenizers are the offline byte-level ones, so prompts are spelled out character by character:
fine for timing and memory, meaningless for images. PixArt's text encoder is T5-v1.1-XXL's encoder
(:data:`T5_XXL`, 4.76 B parameters): build it on ``meta`` unless its bytes are wanted.
"""

from __future__ import annotations

from typing import Any

import torch

from ..registry import CLIP_BIG_G, CLIP_L, SD_VAE_CONFIG, TRANSFORMER_CONFIGS, UNET_CONFIGS
from .tokenizer import byte_level_clip_tokenizer

FAMILIES = ("sd15", "sdxl", "pixart-alpha", "pixart-sigma")
# The encoder of T5-v1.1-XXL (google/t5-v1_1-xxl), PixArt's text encoder.
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "d_kv": 64,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
}
# Caption tokens the PixArt pipelines encode by default (their ``max_sequence_length``).
PIXART_CAPTION_TOKENS = {"pixart-alpha": 120, "pixart-sigma": 300}


def random_full_size_pipeline(family: str, dtype: torch.dtype, device: torch.device | str) -> Any:
    """An SD-1.5 (``"sd15"``), SD-XL (``"sdxl"``), PixArt-Alpha or PixArt-Sigma pipeline of full size with
    random weights."""
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
    if family in PIXART_CAPTION_TOKENS:
        return random_pixart_pipeline(family, dtype, device)
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


def random_pixart_pipeline(family: str, dtype: torch.dtype, device: torch.device | str) -> Any:
    """PixArt-Alpha (SD VAE) or PixArt-Sigma (SD-XL VAE): the full-size transformer, T5-XXL's encoder."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = byte_level_clip_tokenizer(model_max_length=PIXART_CAPTION_TOKENS[family])
    sigma = family == "pixart-sigma"
    with torch.device(device):
        transformer = PixArtTransformer2DModel(**TRANSFORMER_CONFIGS[family])
        text_encoder = T5EncoderModel(T5Config(**T5_XXL, pad_token_id=tokenizer.pad_token_id))
        vae = AutoencoderKL(**SD_VAE_CONFIG, sample_size=1024 if sigma else 512,
                            scaling_factor=0.13025 if sigma else 0.18215)  # fmt: skip
    pipeline = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = pipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                    scheduler=DPMSolverMultistepScheduler())  # fmt: skip
    return pipe.to(dtype=dtype)


__all__ = [
    "FAMILIES",
    "PIXART_CAPTION_TOKENS",
    "T5_XXL",
    "random_full_size_pipeline",
    "random_pixart_pipeline",
]
