"""The banded DiT's cost model: device and host bytes, FLOPs and host traffic of one call, predicted without
computing anything, by walking the same passes on ``meta`` (one band of each size traced per kind of pass),
in well under a second at 16K."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..banded_shell import DEFAULT_BAND_BYTES, BandedCost
from .patch import BandedDiT


@dataclass(frozen=True)
class DiTCost(BandedCost):
    """What one banded DiT call costs; ``plain_flops`` are the unbanded LinFusion forward's (the banded
    ones less the captions' keys and values projected again for every band)."""


def meta_dit_inputs(
    transformer: nn.Module, batch: int, latent_height: int, latent_width: int, dtype: torch.dtype,
    caption_tokens: int,
) -> dict[str, object]:  # fmt: skip
    """Keyword arguments of one PixArt transformer call on ``meta`` (latent, captions and their mask,
    timestep, PixArt-Alpha's resolution and aspect-ratio conditions)."""
    config = transformer.config
    meta = {"device": "meta", "dtype": dtype}
    added = {"resolution": None, "aspect_ratio": None}
    if transformer.use_additional_conditions:
        added = {"resolution": torch.empty(batch, 2, **meta), "aspect_ratio": torch.empty(batch, 1, **meta)}
    return {
        "hidden_states": torch.empty(batch, config.in_channels, latent_height, latent_width, **meta),
        "encoder_hidden_states": torch.empty(batch, caption_tokens, config.caption_channels, **meta),
        "encoder_attention_mask": torch.empty(batch, caption_tokens, **meta),
        "timestep": torch.empty(batch, device="meta", dtype=torch.long),
        "added_cond_kwargs": added,
    }


def banded_dit_cost(
    transformer: nn.Module,
    width: int,
    height: int,
    *,
    dtype: torch.dtype = torch.float16,
    batch: int = 2,
    band_bytes: int = DEFAULT_BAND_BYTES,
    store_on_host: bool = True,
    device_store_bytes: int | None = None,
    vae_scale_factor: int = 8,
    caption_tokens: int = 300,
) -> DiTCost:
    """The cost of one banded call at ``width`` x ``height`` px, without computing anything.

    ``transformer``: a PixArt transformer on ``meta`` with LinFusion mounted (the planner's structure copy;
    only its structure is used). ``batch`` 2 is classifier-free guidance in one call; 1 is one branch.
    ``store_on_host``: a separate store (``store_device="cpu"``) with ``device_store_bytes`` of it allowed
    on the device.
    """
    if next(transformer.parameters()).device.type != "meta":
        raise ValueError("banded_dit_cost traces a structure on the meta device; pass a copy built on meta")
    inputs = meta_dit_inputs(
        transformer, batch, height // vae_scale_factor, width // vae_scale_factor, dtype, caption_tokens
    )
    banded = BandedDiT(
        transformer,
        band_bytes=band_bytes,
        store_device="cpu" if store_on_host else None,
        device_store_bytes=device_store_bytes,
    )
    hidden = inputs.pop("hidden_states")
    captions = inputs.pop("encoder_hidden_states")
    timestep = inputs.pop("timestep")
    run = banded.traced_cost(hidden, captions, timestep, **inputs)
    return DiTCost.of_run(run, plain_flops=run.flops - run.repeated_flops)


__all__ = ["DiTCost", "banded_dit_cost", "meta_dit_inputs"]
