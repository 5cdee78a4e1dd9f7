"""The linear kernel for a VAE's mid-block attention, as a reversible patch, and a measure of its fidelity.

:func:`apply_vae_attention` installs :class:`~linfusion.vae_attention.LinearVAEAttnProcessor` ("linear")
or the VAE's own softmax processor ("exact") on every mid-block attention that is not already running
that kernel; the handle's ``remove()`` puts back exactly the processors it replaced.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..vae_attention import (
    VAE_ATTENTION_MODES,
    LinearVAEAttnProcessor,
    check_vae_attention,
    is_linear,
    mid_block_tokens,
    psnr,
    vae_attentions,
)
from .base import Patch, PatchOrderError


def set_processor(layer: nn.Module, processor: Any) -> Patch:
    """``layer.set_processor(processor)``; ``remove()`` puts the previous processor back."""
    previous = layer.processor
    layer.set_processor(processor)

    def undo() -> None:
        if layer.processor is not processor:
            raise PatchOrderError("the attention processor was changed again after this patch")
        layer.set_processor(previous)

    return Patch(f"processor {type(processor).__name__}", [undo])


def apply_vae_attention(vae: nn.Module, mode: str, eps: float = 1e-4) -> Patch:
    """Run the VAE's mid-block attentions with the ``mode`` kernel: "linear" or "exact" (softmax).

    Layers already running that kernel are left alone (so applying twice changes nothing the second time).
    """
    if mode not in VAE_ATTENTION_MODES:
        raise ValueError(f"vae attention must be one of {VAE_ATTENTION_MODES}; got {mode!r}")
    from diffusers.models.attention_processor import AttnProcessor2_0

    patch = Patch(f"{mode} VAE attention")
    for layer in vae_attentions(vae):
        check_vae_attention(layer)
        if is_linear(layer) == (mode == "linear"):
            continue
        patch.add(
            set_processor(layer, LinearVAEAttnProcessor(eps) if mode == "linear" else AttnProcessor2_0())
        )
    return patch


class _ResidualOnly:
    """A processor that drops the layer: what the attention contributes is measured against it."""

    def __call__(
        self, attn: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        return hidden_states


def _dropped_attention(vae: nn.Module) -> Patch:
    patch = Patch("VAE attention dropped")
    for layer in vae_attentions(vae):
        patch.add(set_processor(layer, _ResidualOnly()))
    return patch


@torch.no_grad()
def measure_vae_attention(vae: nn.Module, images: torch.Tensor, sizes: Any = ()) -> list[dict[str, Any]]:
    """How close the linear VAE attention is to the VAE's own, on ``images`` (B, 3, H, W) in [-1, 1].

    For each size (default: the images' own) encode + decode with the exact and the linear layers, and
    with the layer dropped (its residual only) as the scale of what the layer contributes. Returns one
    record per size: PSNR of the exact reconstruction to the input, linear to exact, dropped to exact.
    The VAE is left as it was.
    """
    records = []
    for size in sizes or (images.shape[-1],):
        batch = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        batch = batch.to(next(vae.parameters()))
        outputs = {}
        for mode in ("exact", "linear", "dropped"):
            kernel = apply_vae_attention(vae, "linear" if mode == "linear" else "exact")
            with kernel, _dropped_attention(vae) if mode == "dropped" else Patch("nothing"):
                latents = vae.encode(batch).latent_dist.mean
                outputs[mode] = vae.decode(latents).sample.float()
        records.append(
            {
                "size": size,
                "tokens": mid_block_tokens(vae, size, size),
                "reconstruction_psnr": psnr(outputs["exact"], batch.float().clamp(-1, 1)),
                "linear_vs_exact_psnr": psnr(outputs["linear"], outputs["exact"].clamp(-1, 1)),
                "dropped_vs_exact_psnr": psnr(outputs["dropped"], outputs["exact"].clamp(-1, 1)),
            }
        )
    return records


__all__ = ["apply_vae_attention", "measure_vae_attention", "set_processor"]
