"""The exact tiled VAE behind ``vae.encode`` / ``vae.decode``, so every pipeline using the VAE tiles exactly.

The tiler itself (:mod:`linfusion.tiled_vae`) computes the same result as the plain VAE with bounded
working memory; this patch routes the VAE's own ``_encode`` / ``_decode`` through it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..tiled_vae import tiled_decode, tiled_encode_moments
from .base import Patch, set_attribute


def apply_exact_tiling(vae: nn.Module, min_pixels: int = 0, **options: Any) -> Patch:
    """Make ``vae.encode``/``vae.decode`` tile exactly (``options`` go to :class:`~linfusion.tiled_vae.ExactTiler`).

    Images of fewer than ``min_pixels`` output pixels keep the plain path. ``remove()`` puts the VAE's
    previous ``_encode`` / ``_decode`` back (the class methods, or an earlier tiling's).
    """
    from diffusers.models.autoencoders.vae import DecoderOutput

    plain_decode, plain_encode = vae._decode, vae._encode
    factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def decode(z: torch.Tensor, return_dict: bool = True) -> Any:
        if z.shape[-1] * z.shape[-2] * factor * factor < min_pixels:
            return plain_decode(z, return_dict=return_dict)
        sample = tiled_decode(vae, z, **options).to(z.device)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def encode(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] * x.shape[-2] < min_pixels:
            return plain_encode(x)
        return tiled_encode_moments(vae, x, **options).to(x.device)

    patch = Patch("exact tiled VAE")
    patch.add(set_attribute(vae, "_decode", decode))
    patch.add(set_attribute(vae, "_encode", encode))
    return patch


__all__ = ["apply_exact_tiling"]
