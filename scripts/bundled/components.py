"""The small bundled text-to-image model: builders for its real diffusers / transformers parts (training side).

Everything is a stock class (AutoencoderKL, CLIPTextModel + CLIPTokenizer, UNet2DConditionModel,
DDIMScheduler, StableDiffusionPipeline), so the bundled model exercises exactly the code paths a real
Stable Diffusion checkpoint does, at a size that trains on one CPU core.

Design choices (see docs/bundled-model.md): 32 px images, a 2x VAE (16x16x4 latents), a word-level
tokenizer (one token per caption word, 32 tokens), a 2-layer text encoder trained jointly with the
UNet, v-prediction on the cosine schedule (the v loss weights the high-noise steps where the caption
decides the image, which epsilon prediction nearly ignores), DDIM with "leading" spacing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from linfusion.bundled import load_pipeline, shapes
from linfusion.bundled.paths import CLASSIFIER_DIR, IMAGE_SIZE, MODEL_DIR
from linfusion.testing import byte_level_clip_tokenizer

MAX_TOKENS = 32
TEXT_HIDDEN = 128
__all__ = ["CLASSIFIER_DIR", "IMAGE_SIZE", "MODEL_DIR", "load_pipeline"]  # re-exported for the scripts


def build_tokenizer(model_max_length: int = MAX_TOKENS) -> Any:
    """A CLIPTokenizer built offline whose vocabulary holds every caption word as one token.

    ``byte_level_clip_tokenizer`` builds each word by left-to-right merges; BPE applies the
    lowest-ranked merge first, so a short word's first merge (``a+n`` of "and") can break a longer
    word's chain ("orange", "triangle"). Listing longer words first gives their merges the lower
    ranks; the result is checked, so a vocabulary change that breaks this fails loudly.
    """
    words = sorted(shapes.vocabulary(), key=lambda word: (-len(word), word))
    tokenizer = byte_level_clip_tokenizer(model_max_length=model_max_length, words=words)
    split = [word for word in words if len(tokenizer(word).input_ids) != 3]
    if split:
        raise RuntimeError(f"words not tokenized as one token each: {split}")
    return tokenizer


def build_text_encoder(tokenizer: Any, hidden_size: int = TEXT_HIDDEN, seed: int = 0) -> Any:
    """A small CLIPTextModel sized to the tokenizer (positions >= its model_max_length)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden_size,
        hidden_act="gelu",
    )
    return CLIPTextModel(config)


def build_vae(seed: int = 0) -> Any:
    """A 2-level AutoencoderKL (2x downsampling, 4 latent channels, 8-group norms)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
    )


def build_unet(cross_attention_dim: int = TEXT_HIDDEN, seed: int = 0) -> Any:
    """A UNet2DConditionModel with self- and cross-attention at its two finest levels and the middle."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,  # diffusers quirk: this is the number of heads
    )


def scheduler_config() -> dict[str, Any]:
    """Cosine schedule, v-prediction; DDIM 'leading' spacing with offset 1 (trailing gave noise)."""
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }


def build_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**scheduler_config())


def assemble_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any = None) -> Any:
    """A StableDiffusionPipeline from the parts (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler if scheduler is not None else build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(seed: int = 0) -> Any:
    """A freshly initialised (untrained) bundled pipeline."""
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer, seed=seed)
    return assemble_pipeline(build_vae(seed), text_encoder, tokenizer, build_unet(seed=seed))


def save_pipeline(pipe: Any, folder: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Save as a diffusers folder with ``dtype`` safetensors (the pipeline itself is left unchanged).

    transformers 5 loads a model in the dtype its config names ("auto"), diffusers in float32, so a
    plain ``from_pretrained(folder)`` would pair an fp16 text encoder with an fp32 UNet and fail; the
    text encoder's config therefore names float32 (its weights stay fp16 on disk).
    """
    import copy
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    saved = copy.deepcopy(pipe).to(dtype=dtype)
    saved.save_pretrained(folder, safe_serialization=True)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
