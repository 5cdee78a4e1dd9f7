"""Helpers shared by the exact tiled VAE's tests: small VAEs with perturbed weights and store policies."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from linfusion.tiled_vae import ExactTiler, StoreBudgetError

ONE_ROW = 1  # a band budget so small that every layer runs one row at a time
MIB, GIB = 2**20, 2**30
POLICIES = ("full", "mixed", "level-inputs", "minimum")
FOUR_LEVEL = {
    "block_out_channels": (16, 32, 32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "layers_per_block": 2,
}


def perturbed(vae: AutoencoderKL) -> AutoencoderKL:
    """Random weights away from their initial values (GroupNorm affine included)."""
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return vae


def four_level_vae() -> AutoencoderKL:
    """SD-VAE-shaped: 4 levels (factor 8), channel changes (1x1 shortcuts), mid-block attention."""
    torch.manual_seed(1)
    return perturbed(AutoencoderKL(**FOUR_LEVEL).eval())


def smallest_budget(vae: AutoencoderKL, shape: tuple, encode: bool, **options) -> int:
    with pytest.raises(StoreBudgetError) as refused:
        ExactTiler(vae, store_limit_bytes=0, **options).plan(shape, encode)
    return refused.value.minimum


def policy_options(
    vae: AutoencoderKL, shape: tuple, encode: bool, policy: str, band_bytes: int, block_bytes: int = ONE_ROW
) -> dict:
    """``full``: every point stored; ``level-inputs``: only the levels' inputs; ``minimum``: the smallest
    store that works (most recomputation); ``mixed``: halfway between the minimum and the full store.
    Store blocks of one row by default, so that rows are freed as they are read even at these sizes."""
    options: dict = {"band_bytes": band_bytes, "store_block_bytes": block_bytes}
    if policy == "level-inputs":
        options["store_points"] = "level-inputs"
    elif policy in ("minimum", "mixed"):
        minimum = smallest_budget(vae, shape, encode, **options)
        full = ExactTiler(vae, **options).plan(shape, encode).store_peak
        options["store_limit_bytes"] = minimum if policy == "minimum" else (minimum + full) // 2
    return options


def images_for(vae: AutoencoderKL, batch: int = 2) -> torch.Tensor:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return torch.rand(batch, 3, 13 * factor, 7 * factor) * 2 - 1  # odd latent sizes
