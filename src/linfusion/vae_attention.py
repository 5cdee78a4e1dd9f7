"""Linear attention for the VAE mid-block: the one quadratic layer left in an ultra-high-resolution run.

With LinFusion mounted the UNet is linear in the number of tokens, but the VAE's mid-block keeps a global
softmax self-attention. At 4096 px with the bundled 2x VAE it attends over 4.2M tokens (about 4.5e15
FLOP per decode, days on a CPU); at 16K with an SD 8x VAE over 4.2M tokens too. Exact tiling
(:mod:`linfusion.tiled_vae`) bounds its *memory* but not its quadratic *time*.

:class:`LinearVAEAttnProcessor` swaps that layer's kernel for LinFusion's normalized linear attention
(phi = elu + 1, :func:`linfusion.ops.linear_attention`) and keeps the layer's own weights, GroupNorm and
residual: no training. It is an approximation of the VAE, so it is opt-in
(``vae_attention="linear"``, applied by :func:`linfusion.patches.vae_attention.apply_vae_attention`) and
:func:`linfusion.patches.vae_attention.measure_vae_attention` reports how close it is on a given VAE.
Measured on the bundled VAE (``benchmarks/vae_attention.py``): encode + decode within 46-48 dB PSNR of the
softmax VAE at 32-512 px, while dropping the layer lands at 24-26 dB; the VAE's own reconstruction is at
33-37 dB, so the change is well below the VAE's own error. SD's VAEs have not been measured here (no
weights offline): run the measurement before relying on it there.

It is a diffusers attention processor; the patch installs it with ``attn.set_processor`` and its handle's
``remove()`` puts back the processors that were there. The exact tiler recognises it and runs it as two passes over
row bands (accumulate the state of all keys, then read it per band), so tiled and untiled decodes agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .choices import VAE_ATTENTION_MODES
from .ops import linear_attention


class LinearVAEAttnProcessor:
    """diffusers processor for a VAE ``Attention`` (GroupNorm, residual, no cross-attention): linear kernel."""

    def __init__(self, eps: float = 1e-4) -> None:
        self.eps = eps

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        check_vae_attention(attn)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the linear VAE attention is a self-attention without mask")
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        tokens = attn.group_norm(hidden_states).flatten(2).transpose(1, 2)
        query = split_heads(attn, attn.to_q(tokens))
        key, value = split_heads(attn, attn.to_k(tokens)), split_heads(attn, attn.to_v(tokens))
        out = output_projection(attn, self.attend(query, key, value))
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        return (out + residual) / attn.rescale_output_factor

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The kernel on (B, h, N, d) heads; spatial parallelism swaps this step (as for LinFusion's attn1)."""
        return linear_attention(query, key, value, eps=self.eps)


def split_heads(attn: nn.Module, projected: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    batch, tokens, channels = projected.shape
    return projected.view(batch, tokens, attn.heads, channels // attn.heads).transpose(1, 2)


def output_projection(attn: nn.Module, heads: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> ``to_out`` applied to the merged heads, (B, N, C)."""
    batch, count, tokens, dim = heads.shape
    merged = heads.transpose(1, 2).reshape(batch, tokens, count * dim)
    return attn.to_out[1](attn.to_out[0](merged))


def check_vae_attention(attn: nn.Module) -> None:
    """The layer shape both the processor and the exact tiler rely on; a clear error otherwise."""
    problems = []
    if getattr(attn, "group_norm", None) is None:
        problems.append("no GroupNorm")
    if not getattr(attn, "residual_connection", False):
        problems.append("no residual connection")
    if getattr(attn, "spatial_norm", None) is not None or getattr(attn, "norm_cross", None) is not None:
        problems.append("a spatial or cross norm")
    if problems:
        raise ValueError(
            f"not a VAE mid-block self-attention ({', '.join(problems)}); "
            "linearize only AutoencoderKL mid-block attentions"
        )


def vae_attentions(vae: nn.Module) -> list[nn.Module]:
    """The mid-block attentions of an ``AutoencoderKL`` (encoder and decoder), in that order."""
    found = []
    for part in (getattr(vae, "encoder", None), getattr(vae, "decoder", None)):
        mid = getattr(part, "mid_block", None)
        for attention in getattr(mid, "attentions", None) or ():
            if attention is not None:
                found.append(attention)
    return found


def is_linear(attn: nn.Module) -> bool:
    return isinstance(getattr(attn, "processor", None), LinearVAEAttnProcessor)


def vae_attention_mode(vae: nn.Module) -> str:
    """``"linear"`` when every mid-block attention runs linearly, ``"exact"`` when none does."""
    layers = vae_attentions(vae)
    linear = [is_linear(layer) for layer in layers]
    if layers and all(linear):
        return "linear"
    if any(linear):
        return "mixed"
    return "exact"


def mid_block_tokens(vae: nn.Module, width: int, height: int) -> int:
    """Tokens the mid-block attention sees for a ``width`` x ``height`` image."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (width // factor) * (height // factor)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2); the reconstruction is clamped to that range."""
    mse = (reconstruction.double().clamp(-1, 1) - target.double()).square().mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


QUADRATIC_HINT_TOKENS = 2**18  # ~6 minutes per decode + encode on one CPU core with the bundled VAE


def quadratic_attention_hint(vae: nn.Module, sizes: Sequence[tuple[int, int]]) -> str | None:
    """A note for users about to run the softmax mid-block attention over very many tokens, else None."""
    layers = vae_attentions(vae)
    if not layers or not sizes or vae_attention_mode(vae) == "linear":
        return None
    width, height = max(sizes, key=lambda size: size[0] * size[1])
    tokens = mid_block_tokens(vae, width, height)
    if tokens < QUADRATIC_HINT_TOKENS:
        return None
    flop = 4 * tokens**2 * layers[-1].to_q.in_features
    return (
        f"note: the VAE's mid-block softmax attention attends over {tokens:,} tokens at {width}x{height} "
        f"(about {flop:.1e} FLOP per decode, quadratic in the tokens); --vae-attention linear makes it "
        "linear (a close approximation, see docs/high-resolution.md)"
    )


__all__ = [
    "VAE_ATTENTION_MODES",
    "LinearVAEAttnProcessor",
    "check_vae_attention",
    "is_linear",
    "mid_block_tokens",
    "output_projection",
    "psnr",
    "quadratic_attention_hint",
    "split_heads",
    "vae_attention_mode",
    "vae_attentions",
]
