"""Tiny random diffusers pipelines built in code: offline tests, examples and CI without any download.

Each builder returns a real diffusers pipeline (real classes, real configs) whose weights are random and
whose sizes are a few hundred kilobytes, shaped like one of the families LinFusion targets:
SD-1.5 (epsilon, 8-head style), SD-2.1 (v-prediction, linear projections) and SD-XL (two text encoders,
added time ids, several transformer layers per block); and PixArt-Alpha / PixArt-Sigma (a
``PixArtTransformer2DModel`` with a T5 text encoder; Alpha with its resolution and aspect-ratio embeddings).
"""

from __future__ import annotations

from typing import Any

import torch

from .tokenizer import byte_level_clip_tokenizer


def tiny_text_encoder(hidden_size: int = 32, projection_dim: int | None = None, seed: int = 0) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=600,
        max_position_embeddings=77,
        projection_dim=projection_dim or hidden_size,
        hidden_act="gelu",
    )
    model_class = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return model_class(config).eval()


def tiny_vae(seed: int = 0) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
    ).eval()


def tiny_unet(family: str = "sd15", seed: int = 0, in_channels: int = 4) -> Any:
    """A small ``UNet2DConditionModel`` with self-attention at two levels, shaped like ``family``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common: dict[str, Any] = {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": 16,
        "in_channels": in_channels,
        "out_channels": 4,
        "norm_num_groups": 8,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    }
    if family == "sd15":
        config = {**common, "attention_head_dim": 4, "cross_attention_dim": 32}
    elif family == "sd21":
        config = {
            **common,
            "attention_head_dim": (2, 4),
            "cross_attention_dim": 32,
            "use_linear_projection": True,
        }
    elif family == "sdxl":
        config = {
            **common,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "layers_per_block": 2,
            "attention_head_dim": (2, 4),
            "transformer_layers_per_block": (1, 2),
            "use_linear_projection": True,
            "cross_attention_dim": 64,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
        }
    else:
        raise ValueError(f"unknown family {family!r}: choose sd15, sd21 or sdxl")
    return UNet2DConditionModel(**config).eval()


PIXART_FAMILIES = ("pixart-alpha", "pixart-sigma")


def tiny_t5_encoder(hidden_size: int = 32, seed: int = 0) -> Any:
    """A 2-layer ``T5EncoderModel`` over the byte-level tokenizer's ids (relative positions: any length)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=600,
        d_model=hidden_size,
        d_kv=8,
        d_ff=2 * hidden_size,
        num_layers=2,
        num_heads=4,
        pad_token_id=513,
        eos_token_id=513,
        feed_forward_proj="gated-gelu",
    )
    return T5EncoderModel(config).eval()


def tiny_transformer(family: str = "pixart-sigma", seed: int = 0, caption_channels: int = 32) -> Any:
    """A small ``PixArtTransformer2DModel`` (2 blocks, width 48, patch 2, learned sigma), shaped like ``family``."""
    from diffusers import PixArtTransformer2DModel

    if family not in PIXART_FAMILIES:
        raise ValueError(f"unknown transformer family {family!r}: choose {' or '.join(PIXART_FAMILIES)}")
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=6,  # width 48: Alpha's size embeddings split the width in three
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=48,
        attention_bias=True,
        # PixArt-Alpha's pipeline passes its resolution/aspect conditions only to sample size 128 (1024 px)
        sample_size=128 if family == "pixart-alpha" else 16,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=caption_channels,
        use_additional_conditions=family == "pixart-alpha",
    ).eval()


def tiny_scheduler(prediction_type: str = "epsilon") -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_components(family: str = "sd15", seed: int = 0, unet_in_channels: int = 4) -> dict[str, Any]:
    """The components of a tiny pipeline of ``family`` ("sd15", "sd21", "sdxl", "pixart-alpha", "pixart-sigma")."""
    if family in PIXART_FAMILIES:
        from diffusers import DPMSolverMultistepScheduler

        return {
            "transformer": tiny_transformer(family, seed),
            "vae": tiny_vae(seed),
            "scheduler": DPMSolverMultistepScheduler(),
            "tokenizer": byte_level_clip_tokenizer(),
            "text_encoder": tiny_t5_encoder(32, seed=seed),
        }
    components: dict[str, Any] = {
        "unet": tiny_unet(family, seed, in_channels=unet_in_channels),
        "vae": tiny_vae(seed),
        "scheduler": tiny_scheduler("v_prediction" if family == "sd21" else "epsilon"),
        "tokenizer": byte_level_clip_tokenizer(),
    }
    if family == "sdxl":
        components["text_encoder"] = tiny_text_encoder(32, seed=seed)
        components["text_encoder_2"] = tiny_text_encoder(32, projection_dim=32, seed=seed + 1)
        components["tokenizer_2"] = byte_level_clip_tokenizer()
    else:
        components["text_encoder"] = tiny_text_encoder(32, seed=seed)
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return components


def tiny_pipeline(family: str = "sd15", task: str = "text2img", seed: int = 0) -> Any:
    """A tiny random diffusers pipeline: ``task`` is "text2img", "img2img" or "inpaint" (PixArt: text2img)."""
    import diffusers

    names = {
        ("sd15", "text2img"): "StableDiffusionPipeline",
        ("sd15", "img2img"): "StableDiffusionImg2ImgPipeline",
        ("sd15", "inpaint"): "StableDiffusionInpaintPipeline",
        ("sd21", "text2img"): "StableDiffusionPipeline",
        ("sd21", "img2img"): "StableDiffusionImg2ImgPipeline",
        ("sd21", "inpaint"): "StableDiffusionInpaintPipeline",
        ("sdxl", "text2img"): "StableDiffusionXLPipeline",
        ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline",
        ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline",
        ("pixart-alpha", "text2img"): "PixArtAlphaPipeline",
        ("pixart-sigma", "text2img"): "PixArtSigmaPipeline",
    }
    if (family, task) not in names:
        raise ValueError(f"no tiny pipeline for family={family!r}, task={task!r}")
    pipeline_class = getattr(diffusers, names[(family, task)])
    pipe = pipeline_class(**tiny_components(family, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_image_folder(
    folder: str | Any, count: int = 8, size: tuple[int, int] = (40, 32), seed: int = 0, captions: bool = True
) -> list[Any]:
    """A small captioned image folder (coloured rectangles on a background), as distillation reads one.

    Images are ``size`` = (width, height), deliberately not square, so crops are exercised. Each
    ``NAME.png`` gets a same-stem ``NAME.txt`` caption unless ``captions`` is False. Returns the image paths.
    """
    from pathlib import Path

    import numpy as np
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
    names = list(colours)
    rng = np.random.default_rng(seed)
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    width, height = size
    for index in range(count):
        foreground, background = rng.choice(len(names), size=2, replace=False)
        pixels = np.empty((height, width, 3), dtype=np.uint8)
        pixels[:] = colours[names[background]]
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        pixels[top : top + height // 2, left : left + width // 2] = colours[names[foreground]]
        path = root / f"image_{index:03d}.png"
        Image.fromarray(pixels).save(path)
        if captions:
            path.with_suffix(".txt").write_text(
                f"a {names[foreground]} square on a {names[background]} background"
            )
        paths.append(path)
    return paths
