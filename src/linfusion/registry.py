"""Which published LinFusion weights fit which Stable Diffusion model.

Resolution order (the first that answers wins):
1. the base model's id, compared case-insensitively with the ids and renamed mirrors listed here
   (a Hugging Face cache path such as ``.../models--org--name/snapshots/<hash>/unet`` counts as ``org/name``);
2. the UNet's architecture signature (the ordered ``attn1`` paths with their widths and heads) compared
   with the signature of each known base model's UNet, rebuilt on the ``meta`` device from its config.
The reference project only knew exact ids; matching by architecture also covers fine-tunes, renamed
mirrors and local folders.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from torch import nn

from .errors import UserError

AttnSignature = tuple[tuple[str, int, int], ...]


class UnsupportedModelError(UserError, TypeError):
    """The model's attention cannot be replaced by LinFusion's (joint text-image attention, already linear,
    no self-attention at all); the message says why and what is supported."""


_SD15_UNET: dict[str, Any] = {
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 64,
}

_SD21_UNET: dict[str, Any] = {
    **_SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "sample_size": 96,
}

_SDXL_UNET: dict[str, Any] = {
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
}

# Full-size UNet configs of the three families, for architecture matching and meta-device structure checks.
UNET_CONFIGS: dict[str, dict[str, Any]] = {"sd15": _SD15_UNET, "sd21": _SD21_UNET, "sdxl": _SDXL_UNET}

# Full-size PixArt transformers (PixArt-XL-2-1024-MS and PixArt-Sigma-XL-2-1024-MS): 28 blocks of width 1152
# (16 heads of 72), patch size 2, T5-XXL captions (4096 channels). Alpha adds resolution/aspect-ratio
# embeddings (``use_additional_conditions``, on by default at sample size 128); Sigma does not.
_PIXART_TRANSFORMER: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "cross_attention_dim": 1152,
    "attention_bias": True,
    "sample_size": 128,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 4096,
}
TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "pixart-alpha": {**_PIXART_TRANSFORMER, "use_additional_conditions": True},
    "pixart-sigma": {**_PIXART_TRANSFORMER, "use_additional_conditions": False},
}

# Diffusion transformers LinFusion cannot linearize, by class name, and why (said in the error).
_JOINT = (
    "its attention is joint: image and text tokens attend together in one softmax attention (MM-DiT), so "
    "there is no image-only self-attention (attn1) for LinFusion's layer to replace"
)
UNSUPPORTED_DENOISERS: dict[str, str] = {
    "SD3Transformer2DModel": f"Stable Diffusion 3: {_JOINT}",
    "FluxTransformer2DModel": f"FLUX: {_JOINT}",
    "Flux2Transformer2DModel": f"FLUX.2: {_JOINT}",
    "ChromaTransformer2DModel": f"Chroma (FLUX-based): {_JOINT}",
    "AuraFlowTransformer2DModel": f"AuraFlow: {_JOINT}",
    "HiDreamImageTransformer2DModel": f"HiDream: {_JOINT}",
    "QwenImageTransformer2DModel": f"Qwen-Image: {_JOINT}",
    "SanaTransformer2DModel": (
        "SANA: its self-attention is already linear (ReLU linear attention), so there is nothing for "
        "LinFusion to linearize"
    ),
}
SUPPORTED_DENOISERS = (
    "UNet2DConditionModel (SD-1.x, SD-2.x, SD-XL and their fine-tunes), ControlNetModel, "
    "PixArtTransformer2DModel (PixArt-Alpha, PixArt-Sigma)"
)


# The published SD VAEs share one architecture (SD-1.x/2.x and SD-XL differ in scaling factor only).
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
# Text encoders: CLIP ViT-L/14 (SD-1.x, SD-XL's first) and OpenCLIP ViT-bigG/14 (SD-XL's second).
CLIP_L: dict[str, int] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
}
CLIP_BIG_G: dict[str, int] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
}


# Caption tokens of a diffusion transformer whose pipeline does not say: PixArt-Sigma's default, the longest.
DIT_CAPTION_TOKENS = 300


def is_sdxl(model: Any) -> bool:
    """True for an SD-XL pipeline (two text encoders) or an SD-XL-shaped UNet (added time ids)."""
    if getattr(model, "text_encoder_2", None) is not None:
        return True
    config = getattr(getattr(model, "unet", model), "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time"


def is_dit(model: Any) -> bool:
    """True for a diffusion-transformer pipeline (a ``transformer``, no ``unet``) or a PixArt transformer."""
    if hasattr(model, "components"):
        return getattr(model, "unet", None) is None and getattr(model, "transformer", None) is not None
    return type(model).__name__ == "PixArtTransformer2DModel"


def max_sequence_length(pipe: Any) -> int:
    """The T5 tokens a PixArt pipeline (or pipeline class) reads by default (PixArt-Alpha 120, PixArt-Sigma
    300): a planning view carries the number as its ``max_sequence_length``, else the ``__call__`` default
    says it; :data:`DIT_CAPTION_TOKENS`, the longest PixArt default, where neither does."""
    if isinstance(getattr(pipe, "max_sequence_length", None), int):
        return pipe.max_sequence_length
    pipeline_class = pipe if isinstance(pipe, type) else type(pipe)
    try:
        parameter = inspect.signature(pipeline_class.__call__).parameters.get("max_sequence_length")
    except (TypeError, ValueError):  # a class with no Python __call__ of its own
        parameter = None
    if parameter is None or not isinstance(parameter.default, int):
        return DIT_CAPTION_TOKENS
    return parameter.default


def check_linearizable(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` when LinFusion's layer cannot replace ``model``'s self-attention.

    Known diffusion transformers whose attention is joint with the text (SD3, FLUX, ...) or already linear
    (SANA) are refused with the reason; any other model must have ``attn1`` self-attention layers.
    """
    name = type(model).__name__
    if name in UNSUPPORTED_DENOISERS:
        raise UnsupportedModelError(
            f"LinFusion cannot be mounted on {name}: {UNSUPPORTED_DENOISERS[name]}. Supported: "
            f"{SUPPORTED_DENOISERS}."
        )
    if not attention_signature(model):
        raise UnsupportedModelError(
            f"{name} has no self-attention (attn1) layers for LinFusion to replace. Supported: "
            f"{SUPPORTED_DENOISERS}."
        )


@dataclass(frozen=True)
class KnownCheckpoint:
    """A published LinFusion checkpoint and the base models it was distilled for."""

    repo_id: str
    family: str
    base_models: tuple[str, ...] = field(default_factory=tuple)


KNOWN_CHECKPOINTS: tuple[KnownCheckpoint, ...] = (
    KnownCheckpoint(
        "Yuanshi/LinFusion-1-5",
        "sd15",
        (
            "runwayml/stable-diffusion-v1-5",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "SG161222/Realistic_Vision_V4.0_noVAE",
            "stablediffusionapi/realistic-vision-v51",
            "Lykon/dreamshaper-8",
        ),
    ),
    KnownCheckpoint("Yuanshi/LinFusion-2-1", "sd21", ("stabilityai/stable-diffusion-2-1",)),
    KnownCheckpoint("Yuanshi/LinFusion-XL", "sdxl", ("stabilityai/stable-diffusion-xl-base-1.0",)),
)

_CACHE_PATH = re.compile(r"models--([^/\\]+?)--([^/\\]+)")


def normalize_model_id(name_or_path: str | None) -> str | None:
    """A comparable id: lower case, no trailing slash; Hub cache paths turned back into ``org/name``."""
    if not name_or_path:
        return None
    text = str(name_or_path).strip().rstrip("/\\")
    match = _CACHE_PATH.search(text)
    if match:
        text = f"{match.group(1)}/{match.group(2)}"
    return text.lower()


def checkpoint_for_model_id(name_or_path: str | None) -> KnownCheckpoint | None:
    """The published checkpoint listed for a base-model id or mirror, if any."""
    wanted = normalize_model_id(name_or_path)
    if wanted is None:
        return None
    for checkpoint in KNOWN_CHECKPOINTS:
        if any(wanted == base.lower() for base in checkpoint.base_models):
            return checkpoint
    return None


def is_self_attention(name: str, module: nn.Module) -> bool:
    """True for a UNet self-attention layer, original or already replaced by LinFusion."""
    from diffusers.models.attention_processor import Attention

    from .attention import GeneralizedLinearAttention

    return name.split(".")[-1] == "attn1" and isinstance(module, (Attention, GeneralizedLinearAttention))


def attention_width_and_heads(module: nn.Module) -> tuple[int, int]:
    """(width C, heads h) of an ``attn1``, a diffusers ``Attention`` or a LinFusion layer."""
    from .attention import GeneralizedLinearAttention

    if isinstance(module, GeneralizedLinearAttention):
        return module.dim, module.heads
    in_features, out_features = module.to_q.in_features, module.to_q.out_features
    if in_features != out_features:
        raise ValueError(
            f"self-attention with query width {in_features} and inner width {out_features} is not supported: "
            "LinFusion layers keep the width"
        )
    return in_features, int(module.heads)


def attention_has_bias(module: nn.Module) -> bool:
    """Whether an ``attn1``'s q/k/v projections carry biases (PixArt's do, the SD UNets' do not)."""
    from .attention import GeneralizedLinearAttention

    if isinstance(module, GeneralizedLinearAttention):
        return module.bias
    return module.to_q.bias is not None


def attention_signature(model: nn.Module) -> AttnSignature:
    """The ordered (path, width, heads) of every ``attn1`` in ``model``."""
    return tuple(
        (name, *attention_width_and_heads(module))
        for name, module in model.named_modules()
        if is_self_attention(name, module)
    )


def build_meta_unet(family: str) -> nn.Module:
    """A full-size UNet of a known family on the ``meta`` device: structure only, no memory."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**UNET_CONFIGS[family])


def build_meta_transformer(family: str) -> nn.Module:
    """A full-size PixArt transformer ("pixart-alpha" or "pixart-sigma") on the ``meta`` device."""
    from diffusers import PixArtTransformer2DModel

    with torch.device("meta"):
        return PixArtTransformer2DModel(**TRANSFORMER_CONFIGS[family])


@cache
def family_signature(family: str) -> AttnSignature:
    return attention_signature(build_meta_unet(family))


def checkpoint_for_signature(signature: AttnSignature) -> KnownCheckpoint | None:
    """The published checkpoint whose base UNet has exactly this ``attn1`` layout, if any."""
    for checkpoint in KNOWN_CHECKPOINTS:
        if family_signature(checkpoint.family) == signature:
            return checkpoint
    return None


def resolve_checkpoint(unet: nn.Module, model_ids: list[str | None]) -> tuple[str, str]:
    """Pick published LinFusion weights for ``unet``; returns (repo id, how it was matched).

    Raises ``LookupError`` listing every id and signature tried, and how to pass weights explicitly.
    """
    tried: list[str] = []
    for model_id in model_ids:
        if not model_id:
            continue
        checkpoint = checkpoint_for_model_id(model_id)
        tried.append(f"model id {model_id!r}")
        if checkpoint is not None:
            return checkpoint.repo_id, f"model id {model_id!r}"
    signature = attention_signature(unet)
    checkpoint = checkpoint_for_signature(signature)
    tried.append(f"UNet architecture ({len(signature)} self-attention layers)")
    if checkpoint is not None:
        return checkpoint.repo_id, f"UNet architecture matches {checkpoint.family}"
    known = ", ".join(f"{c.repo_id} ({c.family})" for c in KNOWN_CHECKPOINTS)
    raise LookupError(
        "No published LinFusion weights fit this model. Tried: "
        + "; ".join(tried)
        + f". Known checkpoints: {known}. Pass weights explicitly with "
        "LinFusion.construct_for(pipe, pretrained_model_name_or_path='<hub id or local folder>'), "
        "or build untrained modules with load_pretrained=False (then distill them: `linfusion distill`)."
    )
