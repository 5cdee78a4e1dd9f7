"""What the banded DiT supports: a PixArt transformer with LinFusion's ``attn1`` in every block; anything
else is refused with :class:`UnsupportedDiT` before any change or any work."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...attention import GeneralizedLinearAttention

SOFTMAX_REFUSAL = (
    "softmax self-attention cannot be banded this way: every output token of a softmax attention depends on "
    "all keys through its normalization, so no fixed-size summary of the other bands exists (keeping every "
    "block's keys and values would bound nothing). Mount LinFusion first (LinFusion.construct_for(pipe)), "
    "whose linear attention needs only a small key/value state from the whole sequence"
)


class UnsupportedDiT(NotImplementedError):
    """The transformer (or the call) has something the banded DiT cannot compute exactly; the message says what."""


def require(condition: bool, where: str, what: str) -> None:
    """Raise :class:`UnsupportedDiT` naming ``where`` and ``what`` unless ``condition`` holds."""
    if not condition:
        raise UnsupportedDiT(f"the banded DiT does not support {where}: {what}")


def check_banded_dit(transformer: nn.Module) -> None:
    """Raise :class:`UnsupportedDiT` unless every layer of ``transformer`` has an exact banded form."""
    from diffusers import PixArtTransformer2DModel
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.embeddings import PatchEmbed

    require(
        isinstance(transformer, PixArtTransformer2DModel), "this model", f"a {type(transformer).__name__}"
    )
    embed = transformer.pos_embed
    require(type(embed) is PatchEmbed, "pos_embed", f"a {type(embed).__name__}")
    require(embed.flatten and not embed.layer_norm, "pos_embed", "a patch embedding with a LayerNorm")
    require(embed.pos_embed_max_size is None, "pos_embed", "a cropped position table (pos_embed_max_size)")
    for index, block in enumerate(transformer.transformer_blocks):
        where = f"transformer_blocks.{index}"
        require(type(block) is BasicTransformerBlock, where, f"a {type(block).__name__}")
        require(block.norm_type == "ada_norm_single", where, f"norm_type {block.norm_type}")
        require(
            block.pos_embed is None and not block.only_cross_attention, where, "a block position embedding"
        )
        require(not hasattr(block, "fuser"), where, "GLIGEN")
        if not isinstance(block.attn1, GeneralizedLinearAttention):
            raise UnsupportedDiT(f"the banded DiT needs LinFusion on {where}.attn1: {SOFTMAX_REFUSAL}")
    dropping = [m for m in transformer.modules() if isinstance(m, nn.Dropout) and m.training and m.p > 0]
    require(not dropping, "the transformer", "active dropout (call transformer.eval())")


def check_call(transformer: nn.Module, sample: torch.Tensor, options: dict[str, Any]) -> None:
    """The per-call conditions: a 4-D latent whose sides divide by the patch size, no GLIGEN, no gradients."""
    patch = transformer.config.patch_size
    require(sample.ndim == 4, "the call", f"a sample of shape {tuple(sample.shape)}")
    require(
        sample.shape[-2] % patch == 0 and sample.shape[-1] % patch == 0,
        "the call",
        f"a latent of {sample.shape[-2]}x{sample.shape[-1]}, not a multiple of the patch size {patch}",
    )
    require("gligen" not in (options.get("cross_attention_kwargs") or {}), "the call", "GLIGEN")


__all__ = ["SOFTMAX_REFUSAL", "UnsupportedDiT", "check_banded_dit", "check_call", "require"]
