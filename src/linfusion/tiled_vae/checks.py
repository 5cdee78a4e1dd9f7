"""What the exact tiler supports: a VAE with any other layer is refused, never approximated.

The chain model (:mod:`.chain`) checks the config; the tiler checks each module it runs against the unit
it computes (kernel sizes, strides, padding, norms, activations), with the functions here. Convolutions
are checked with the row rules' own check (:func:`linfusion.banding.band_conv_problem`).
"""

from __future__ import annotations

from torch import nn

from ..banding import band_conv_problem
from ..vae_attention import check_vae_attention


class UnsupportedVAE(NotImplementedError):
    """The VAE has a layer the exact tiler does not know; use the untiled VAE or diffusers' tiling."""


def check(condition: bool, what: str) -> None:
    """Raise :class:`UnsupportedVAE` naming ``what`` unless ``condition`` holds."""
    if not condition:
        raise UnsupportedVAE(f"exact tiling does not support this VAE: {what}")


def check_conv(
    conv: nn.Module, in_channels: int, out_channels: int, kernel: int, stride: int, padding: int
) -> None:
    """A convolution the row rules of :mod:`linfusion.banding` compute band by band (a plain ``nn.Conv2d``,
    square odd kernel, zero ``padding`` on each side, ``stride``), of these channels and kernel size."""
    problem = band_conv_problem(conv, stride, padding)
    check(problem is None, f"conv: {problem}")
    check(
        conv.in_channels == in_channels and conv.out_channels == out_channels and conv.kernel_size == (kernel, kernel),
        f"conv {in_channels}->{out_channels}",
    )  # fmt: skip


def check_attention(module: nn.Module, heads: int) -> None:
    """The mid-block attention the tiler's attention pass computes (softmax or the linear processor)."""
    try:
        check_vae_attention(module)
    except ValueError as error:
        raise UnsupportedVAE(f"exact tiling does not support this VAE: {error}") from error
    check(module.heads == heads, "attention heads")


def check_resnet(module: nn.Module, in_channels: int, out_channels: int, shortcut: bool) -> None:
    """A ResNet block without resampling or time embedding: GroupNorm, SiLU, 3x3 convs, 1x1 shortcut."""
    check(module.upsample is None and module.downsample is None, "resnet with resampling")
    check(module.time_emb_proj is None and module.time_embedding_norm in ("default", "group"),
          "resnet time embedding")  # fmt: skip
    check(isinstance(module.nonlinearity, nn.SiLU), "resnet activation")
    check(isinstance(module.norm1, nn.GroupNorm) and isinstance(module.norm2, nn.GroupNorm), "resnet norm")
    conv_shortcut = module.conv_shortcut
    check((conv_shortcut is not None) == shortcut, "resnet shortcut")
    check(conv_shortcut is None or conv_shortcut.kernel_size == (1, 1), "resnet shortcut")
    for conv, channels in ((module.conv1, in_channels), (module.conv2, out_channels)):
        check_conv(conv, channels, out_channels, 3, 1, 1)


def check_upsampler(module: nn.Module, in_channels: int, out_channels: int) -> None:
    """Nearest-neighbour x2, then a 3x3 convolution."""
    check(module.use_conv and not module.use_conv_transpose and module.interpolate, "upsampler")
    check_conv(module.conv, in_channels, out_channels, 3, 1, 1)


def check_downsampler(module: nn.Module, in_channels: int, out_channels: int) -> None:
    """A 3x3 convolution of stride 2 after diffusers' one-pixel right and bottom padding."""
    check(module.use_conv and module.padding == 0, "downsampler padding")
    check_conv(module.conv, in_channels, out_channels, 3, 2, 0)


__all__ = [
    "UnsupportedVAE",
    "check",
    "check_attention",
    "check_conv",
    "check_downsampler",
    "check_resnet",
    "check_upsampler",
]
