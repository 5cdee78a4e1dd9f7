"""What the banded DiT supports: a PixArt transformer with LinFusion's ``attn1`` in every block; anything
else is refused with :class:`UnsupportedDiT` before any change or any work."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...attention import GeneralizedLinearAttention
from ..banded_shell import UnsupportedBanding, check_basic_block, check_eval_mode

SOFTMAX_REFUSAL = (
    "softmax self-attention cannot be banded this way: every output token of a softmax attention depends on "
    "all keys through its normalization, so no fixed-size summary of the other bands exists (keeping every "
    "block's keys and values would bound nothing). Mount LinFusion first (LinFusion.construct_for(pipe)), "
    "whose linear attention needs only a small key/value state from the whole sequence"
)


class UnsupportedDiT(UnsupportedBanding):
    """The transformer (or the call) has something the banded DiT cannot compute exactly; the message says what."""

    engine = "the banded DiT"


require = UnsupportedDiT.require


def check_banded_dit(transformer: nn.Module) -> None:
    """Raise :class:`UnsupportedDiT` unless every layer of ``transformer`` has an exact banded form."""
    from diffusers import PixArtTransformer2DModel
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
        check_basic_block(block, where, "ada_norm_single", UnsupportedDiT)
        require(not hasattr(block, "fuser"), where, "GLIGEN")
        if not isinstance(block.attn1, GeneralizedLinearAttention):
            raise UnsupportedDiT(f"the banded DiT needs LinFusion on {where}.attn1: {SOFTMAX_REFUSAL}")
        # spatial parallelism swaps each layer's attend (and the patch embedding): the bands would see one
        # rank's stripe only
        require(
            "attend" not in vars(block.attn1),
            where,
            "spatial parallelism (the banded DiT runs on one process)",
        )
    check_eval_mode(transformer, UnsupportedDiT, "the transformer", "transformer")


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
