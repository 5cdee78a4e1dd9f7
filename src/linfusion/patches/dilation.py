"""DemoFusion's dilated global branch: dilated convolutions on a blurred latent, blended into every UNet call.

Both are reversible patches: :func:`apply_dilation` multiplies every Conv2d's dilation and padding (restored
on ``remove()``, also when the UNet raised meanwhile), :func:`apply_dilated_branch` hooks the UNet so each
call returns ``(1 - c2) plain + c2 dilated-on-blurred`` (see :mod:`linfusion.pipelines.demofusion`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Patch, hooks, set_attribute

DEFAULT_SIGMA = 0.8
COSINE_POWERS = (3.0, 1.0, 1.0)  # c1 (skip residual), c2 (dilated branch), c3 (blur width)


def cosine_factor(timestep: float | torch.Tensor, train_steps: int = 1000) -> float:
    """``(1 + cos(pi (T - t) / T)) / 2``: 1 at the noisiest step, 0 at the cleanest."""
    t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
    return 0.5 * (1.0 + math.cos(math.pi * (train_steps - t) / train_steps))


def apply_dilation(model: nn.Module, scale: int) -> Patch:
    """Multiply every (non 1x1) Conv2d's dilation and padding by ``scale``.

    Output sizes are unchanged (kernel ``k``, padding ``p = (k - 1) / 2``: dilation ``s`` with padding
    ``s p`` covers the same rows), so the UNet runs as usual with a receptive field ``scale`` times wider.
    Every check runs before any convolution changes.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1; got {scale}")
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    for module in convolutions:
        if isinstance(module.padding, str):
            raise ValueError(f"cannot dilate a convolution with padding={module.padding!r}")
    patch = Patch(f"convolutions dilated x{scale}")
    for module in convolutions:
        patch.add(set_attribute(module, "dilation", tuple(d * scale for d in module.dilation)))
        patch.add(set_attribute(module, "padding", tuple(p * scale for p in module.padding)))
    return patch


def gaussian_blur(latents: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Per-channel Gaussian blur (reflect padding), renormalized to each sample's mean and std."""
    if kernel_size <= 1 or sigma <= 0:
        return latents
    radius = kernel_size // 2
    offsets = torch.arange(kernel_size, device=latents.device, dtype=torch.float32) - radius
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = (weights / weights.sum()).to(latents.dtype)
    channels = latents.shape[1]
    x = F.pad(latents, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, weights.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    x = F.conv2d(x, weights.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    dims = tuple(range(1, latents.ndim))
    mean, std = latents.mean(dim=dims, keepdim=True), latents.std(dim=dims, keepdim=True)
    blurred_mean, blurred_std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True)
    return (x - blurred_mean) / blurred_std.clamp_min(1e-6) * std + mean


def _sample_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def apply_dilated_branch(
    unet: nn.Module, scale: int, sigma: float = DEFAULT_SIGMA, train_steps: int = 1000
) -> Patch:
    """Every UNet call returns ``(1 - c2) plain + c2 dilated-on-blurred``, with ``c2 = cf``, ``c3 = 0.99 cf + 0.01``.

    Built from hooks that run outside any other hook on the UNet: the blur and its statistics see the
    whole latent even when spatial parallelism (:mod:`linfusion.parallel`) splits every UNet call into
    stripes, and the second, dilated pass is an ordinary UNet call that is split the same way. With
    ``scale`` < 2 (dilation 1 and a 1-tap blur: the branch is the plain pass) nothing changes.
    """
    if scale < 2:
        return Patch("dilated branch (scale 1: nothing to do)")
    state: dict[str, Any] = {"inner": False, "call": None}

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not state["inner"]:
            state["call"] = (args, kwargs)

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if state["inner"] or state["call"] is None:
            return output
        call_args, call_kwargs = state["call"]
        state["call"] = None
        sample = call_args[0] if call_args else call_kwargs["sample"]
        timestep = call_args[1] if len(call_args) > 1 else call_kwargs["timestep"]
        factor = cosine_factor(timestep, train_steps)
        c2 = factor ** COSINE_POWERS[1]
        c3 = 0.99 * factor ** COSINE_POWERS[2] + 0.01
        blurred = gaussian_blur(sample, 2 * scale - 1, sigma * c3)
        if call_args:
            call_args = (blurred, *call_args[1:])
        else:
            call_kwargs = {**call_kwargs, "sample": blurred}
        state["inner"] = True
        try:
            with apply_dilation(unet, scale):
                dilated = _sample_of(unet(*call_args, **call_kwargs))
        finally:
            state["inner"] = False
        mixed = _sample_of(output) * (1.0 - c2) + dilated * c2
        if isinstance(output, tuple):
            return (mixed, *output[1:])
        output.sample = mixed
        return output

    return hooks(
        f"dilated branch x{scale}",
        [
            unet.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
            unet.register_forward_hook(after, with_kwargs=True),
        ],
    )


__all__ = [
    "COSINE_POWERS",
    "DEFAULT_SIGMA",
    "apply_dilated_branch",
    "apply_dilation",
    "cosine_factor",
    "gaussian_blur",
]
