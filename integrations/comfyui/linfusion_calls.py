"""Every call the node pack makes into ``linfusion``, in one place: a rename there touches only this file.

Only linfusion's public names are used. Nothing here knows about ComfyUI's classes; the other modules
turn ComfyUI's objects into the plain values and diffusers modules these functions take.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from linfusion import LinFusion, LinFusionCheckpointError
from linfusion.patches.vae_attention import apply_vae_attention
from linfusion.pipelines.chain import denoising_steps, plan_stages
from linfusion.registry import KNOWN_CHECKPOINTS, SD_VAE_CONFIG, KnownCheckpoint, family_signature
from linfusion.tiled_vae import StoreBudgetError, tiled_decode, tiled_encode_moments, tiled_vae_cost

Signature = Sequence[tuple[str, int, int]]
VAE_ATTENTION_MODES = ("exact", "linear")
CheckpointError = LinFusionCheckpointError
BudgetError = StoreBudgetError
DEFAULT_VAE_CONFIG: dict[str, Any] = dict(SD_VAE_CONFIG)


def known_checkpoints() -> tuple[KnownCheckpoint, ...]:
    """The published LinFusion checkpoints (repo id, family)."""
    return KNOWN_CHECKPOINTS


def checkpoint_for_layers(signature: Signature) -> KnownCheckpoint | None:
    """The published checkpoint whose base UNet has exactly these ``attn1`` layers (diffusers paths, widths,
    heads), compared as sets: the order in which a UNet lists its blocks does not matter."""
    wanted = sorted(signature)
    for checkpoint in KNOWN_CHECKPOINTS:
        if sorted(family_signature(checkpoint.family)) == wanted:
            return checkpoint
    return None


def load_weights(source: str | os.PathLike, local_only: bool) -> LinFusion:
    """LinFusion weights from a local folder or a Hub id (``local_only``: no download is tried)."""
    return LinFusion.from_pretrained(source, local_files_only=local_only)


def layers_by_path(linfusion: LinFusion) -> dict[str, nn.Module]:
    """Diffusers ``attn1`` path -> LinFusion layer, in checkpoint order."""
    return dict(linfusion.modules_dict)


def layer_width_and_heads(layer: nn.Module) -> tuple[int, int]:
    return int(layer.dim), int(layer.heads)


def decode(vae: nn.Module, latents: torch.Tensor, attention: str, **options: Any) -> torch.Tensor:
    """The exact tiled decode of a diffusers ``AutoencoderKL``, with the ``attention`` mid-block kernel."""
    with apply_vae_attention(vae, attention):
        return tiled_decode(vae, latents, **options)


def encode_moments(vae: nn.Module, images: torch.Tensor, attention: str, **options: Any) -> torch.Tensor:
    """The exact tiled encoder's moments (mean and log-variance, concatenated on channels)."""
    with apply_vae_attention(vae, attention):
        return tiled_encode_moments(vae, images, **options)


def vae_cost(vae_config: dict[str, Any], width: int, height: int, **options: Any) -> Any:
    """The tiled VAE's predicted peaks and FLOPs (``linfusion.tiled_vae.tiled_vae_cost``)."""
    return tiled_vae_cost(vae_config, width, height, **options)


def chain_stages(
    width: int, height: int, base_long_side: int, sdxl: bool, steps: int
) -> list[tuple[int, int, float | None, int]]:
    """The SDEdit chain to ``width`` x ``height`` as linfusion runs it: (width, height, denoise, sampling
    steps) per stage, the base generation first (denoise None, all ``steps``)."""
    stages = plan_stages(width, height, base_long_side, sdxl=sdxl)
    return [(s.width, s.height, s.strength, denoising_steps(s, steps)) for s in stages]
