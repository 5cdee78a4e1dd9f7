"""A cheap live preview of the image while it denoises: a fixed linear map of the latent channels to RGB.

The map is fitted once per model on its own VAE (encode small images of one flat colour each, least squares from
their latents to their colours), so it holds for any model family, the bundled one included, without a
table of coefficients per family. Applying it costs one small matrix product per step, no VAE decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

PREVIEW_SIDE = 256  # previews are shrunk to this long side: a small image, quick to send
FIT_COLOURS = 56  # random flat colours the map is fitted on (with the 8 corners of the RGB cube)


@dataclass(frozen=True)
class LatentPreview:
    """``rgb = [latent channels, 1] @ weights``, in 0..1 (``weights``: channels + 1 rows, 3 columns)."""

    weights: np.ndarray

    def image(self, latents: torch.Tensor) -> Image.Image:
        """The preview of the first image of ``latents`` (batch, channels, height, width)."""
        latent = latents[0].detach().float().cpu().numpy()  # channels, height, width
        channels, height, width = latent.shape
        features = np.concatenate([latent.reshape(channels, -1), np.ones((1, height * width))]).T
        rgb = np.clip(features @ self.weights, 0.0, 1.0).reshape(height, width, 3)
        image = Image.fromarray((rgb * 255).round().astype(np.uint8))
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        return image


@torch.no_grad()
def fit_latent_preview(vae: Any, seed: int = 0) -> LatentPreview:
    """The least-squares linear map from ``vae``'s (scaled) latents to the flat colours they encode."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    corners = [[red, green, blue] for red in (0, 1) for green in (0, 1) for blue in (0, 1)]
    colours = np.concatenate([np.random.default_rng(seed).random((FIT_COLOURS, 3)), np.array(corners, float)])
    parameter = next(vae.parameters())
    side = 8 * factor  # 8 latent pixels per side: the mean of the inner 4x4 (away from the borders)
    images = torch.from_numpy(colours).view(-1, 3, 1, 1).expand(-1, 3, side, side)
    latents = vae.encode(images.to(parameter.device, parameter.dtype) * 2 - 1).latent_dist.mode()
    latents = (latents - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
    means = latents[:, :, 2:-2, 2:-2].float().mean(dim=(2, 3)).cpu().numpy()
    features = np.concatenate([means, np.ones((len(colours), 1))], axis=1)
    weights, *_ = np.linalg.lstsq(features, colours, rcond=None)
    return LatentPreview(weights)


__all__ = ["PREVIEW_SIDE", "LatentPreview", "fit_latent_preview"]
