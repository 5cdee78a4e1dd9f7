"""What the banded UNet supports: every layer of the UNet and every input of the call must have an exact
banded form; anything else is refused with :class:`UnsupportedUNet` before any change or any work."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...attention import GeneralizedLinearAttention
from ...banding import band_conv_problem
from ..banded_shell import UnsupportedBanding, check_basic_block, check_eval_mode


class UnsupportedUNet(UnsupportedBanding):
    """The UNet (or the call) has something the banded forward cannot compute exactly; the message says what."""

    engine = "the banded UNet"


require = UnsupportedUNet.require


def _check_conv(conv: Any, where: str, stride: int = 1) -> None:
    problem = band_conv_problem(conv, stride)
    require(problem is None, where, problem or "")


def _check_pointwise(module: Any, where: str) -> None:
    if isinstance(module, nn.Conv2d):
        require(
            module.kernel_size == (1, 1) and module.stride == (1, 1), where, "a projection wider than 1x1"
        )
    else:
        require(isinstance(module, nn.Linear), where, f"a {type(module).__name__} projection")


def _check_resnet(resnet: Any, where: str) -> None:
    from diffusers.models.resnet import ResnetBlock2D

    require(type(resnet) is ResnetBlock2D, where, f"a {type(resnet).__name__}")
    require(resnet.upsample is None and resnet.downsample is None, where, "resampling inside the ResNet")
    require(
        resnet.time_embedding_norm == "default", where, f"time_embedding_norm={resnet.time_embedding_norm}"
    )
    require(isinstance(resnet.nonlinearity, nn.SiLU), where, f"activation {resnet.nonlinearity}")
    require(
        isinstance(resnet.norm1, nn.GroupNorm) and isinstance(resnet.norm2, nn.GroupNorm),
        where,
        "non-GroupNorm",
    )
    _check_conv(resnet.conv1, f"{where}.conv1")
    _check_conv(resnet.conv2, f"{where}.conv2")
    if resnet.conv_shortcut is not None:
        require(
            isinstance(resnet.conv_shortcut, nn.Conv2d) and resnet.conv_shortcut.kernel_size == (1, 1),
            where,
            "a shortcut wider than 1x1",
        )


def _check_self_attention(attention: Any, where: str) -> None:
    if isinstance(attention, GeneralizedLinearAttention):
        return
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    require(isinstance(attention, Attention), where, f"a {type(attention).__name__} self-attention")
    require(
        type(attention.processor) is AttnProcessor2_0,
        where,
        f"the {type(attention.processor).__name__} processor (the exact softmax path reproduces AttnProcessor2_0)",
    )
    require(
        attention.group_norm is None
        and attention.spatial_norm is None
        and attention.norm_q is None
        and attention.norm_k is None
        and not attention.residual_connection
        and not getattr(attention, "fused_projections", False),
        where,
        "self-attention with norms, a residual or fused projections",
    )


def _check_transformer(transformer: Any, where: str) -> None:
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    require(type(transformer) is Transformer2DModel, where, f"a {type(transformer).__name__}")
    require(transformer.is_input_continuous, where, "non-continuous (vectorized or patched) inputs")
    require(isinstance(transformer.norm, nn.GroupNorm), where, "a non-GroupNorm input norm")
    _check_pointwise(transformer.proj_in, f"{where}.proj_in")
    _check_pointwise(transformer.proj_out, f"{where}.proj_out")
    for index, block in enumerate(transformer.transformer_blocks):
        name = f"{where}.transformer_blocks.{index}"
        check_basic_block(block, name, "layer_norm", UnsupportedUNet)
        _check_self_attention(block.attn1, f"{name}.attn1")
        if block.attn2 is not None:
            require(
                block.attn2.is_cross_attention
                and block.attn2.group_norm is None
                and block.attn2.spatial_norm is None,
                f"{name}.attn2",
                "a second self-attention (double_self_attention) or a spatial norm",
            )


def check_banded_unet(unet: nn.Module) -> None:
    """Raise :class:`UnsupportedUNet` unless every layer of ``unet`` has an exact banded form."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    require(isinstance(unet, UNet2DConditionModel), "this model", f"a {type(unet).__name__}")
    require(unet.config.addition_embed_type != "image_hint", "the UNet", "image-hint inputs")
    _check_conv(unet.conv_in, "conv_in")
    _check_conv(unet.conv_out, "conv_out")
    if unet.conv_norm_out is not None:
        require(isinstance(unet.conv_norm_out, nn.GroupNorm), "conv_norm_out", "a non-GroupNorm output norm")
        require(isinstance(unet.conv_act, nn.SiLU), "conv_act", f"activation {unet.conv_act}")
    kinds = {
        "down_blocks": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_blocks": ("UpBlock2D", "CrossAttnUpBlock2D"),
    }
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    if unet.mid_block is not None:
        require(
            type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn",
            "mid_block",
            type(unet.mid_block).__name__,
        )
        blocks.append(("mid_block", unet.mid_block))
    for where, block in blocks:
        if where != "mid_block":
            require(type(block).__name__ in kinds[where.split(".")[0]], where, type(block).__name__)
        for index, resnet in enumerate(block.resnets):
            _check_resnet(resnet, f"{where}.resnets.{index}")
        for index, transformer in enumerate(getattr(block, "attentions", None) or []):
            _check_transformer(transformer, f"{where}.attentions.{index}")
        for downsampler in getattr(block, "downsamplers", None) or []:
            require(
                type(downsampler) is Downsample2D and downsampler.use_conv and downsampler.norm is None,
                where,
                "a pooling or normalized downsampler",
            )
            require(downsampler.padding == 1, where, "downsample_padding 0 (an extra bottom row)")
            _check_conv(downsampler.conv, f"{where}.downsamplers.0.conv", stride=2)
        for upsampler in getattr(block, "upsamplers", None) or []:
            require(
                type(upsampler) is Upsample2D
                and upsampler.use_conv
                and upsampler.interpolate
                and not upsampler.use_conv_transpose
                and upsampler.norm is None
                and upsampler.name == "conv",
                where,
                "an upsampler other than nearest x2 + conv",
            )
            _check_conv(upsampler.conv, f"{where}.upsamplers.0.conv")
    check_eval_mode(unet, UnsupportedUNet, "the UNet", "unet")
    # spatial parallelism swaps every GroupNorm's forward for one that merges the stripes' statistics: the
    # bands would read one rank's stripe as the whole image
    split = [m for m in unet.modules() if isinstance(m, nn.GroupNorm) and "forward" in vars(m)]
    require(not split, "the UNet", "spatial parallelism (the banded UNet runs on one process)")


def check_call(unet: nn.Module, sample: torch.Tensor, options: dict[str, Any]) -> None:
    """The per-call conditions (inputs, FreeU switched on since the patch was applied)."""
    require(options.get("attention_mask") is None, "the call", "a self-attention mask (attention_mask)")
    require(
        options.get("down_intrablock_additional_residuals") is None,
        "the call",
        "T2I-Adapter residuals (down_intrablock_additional_residuals)",
    )
    down, mid = options.get("down_block_additional_residuals"), options.get("mid_block_additional_residual")
    require((down is None) == (mid is None), "the call", "ControlNet residuals need both down and mid parts")
    require("gligen" not in (options.get("cross_attention_kwargs") or {}), "the call", "GLIGEN")
    for index, block in enumerate(unet.up_blocks):
        freeu = all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2"))
        require(
            not freeu, f"up_blocks.{index}", "FreeU (its Fourier filter is global; disable_freeu() first)"
        )
    require(sample.ndim == 4, "the call", f"a sample of shape {tuple(sample.shape)}")


__all__ = ["UnsupportedUNet", "check_banded_unet", "check_call", "require"]
