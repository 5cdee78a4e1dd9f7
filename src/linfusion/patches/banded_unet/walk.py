"""The walk of one banded UNet call through the UNet's layers: down blocks (their outputs kept as skips),
mid block, up blocks (each ResNet reading its skip), the output convolution."""

from __future__ import annotations

import torch

from ...banding import StoredActivation
from .layers import add_pass, conv_pass, resnet_pass
from .schedule import BandRun, Conditioning
from .transformer import transformer_pass


def walk_unet(
    run: BandRun,
    sample: torch.Tensor,
    conditioning: Conditioning,
    down_residuals: list[torch.Tensor] | None,
    mid_residual: torch.Tensor | None,
) -> torch.Tensor:
    """The UNet's forward, layer by layer, each layer a band pass over activations in ``run``'s store.

    Returns the output on the compute device; every stored activation is released by then.
    """
    unet = run.unet
    batch, _, height, width = sample.shape
    run.context_tokens = conditioning.context.shape[1]
    sizes_needed = any(dim % 2**unet.num_upsamplers for dim in (height, width))
    x = conv_pass(run, [StoredActivation.wrapping(sample)], unet.conv_in, parked=True)
    skips = [x]
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, transformer in zip(block.resnets, attentions):
            y = resnet_pass(run, [x], resnet, conditioning, parked=transformer is None)
            run.release(x, skips)
            x = y
            if transformer is not None:
                y = transformer_pass(run, x, transformer, conditioning, parked=True)
                run.release(x, skips)
                x = y
            skips.append(x)
        if getattr(block, "downsamplers", None):
            x = conv_pass(run, [x], block.downsamplers[0].conv, mode="down", parked=True)
            skips.append(x)

    if down_residuals is not None:
        skips = [
            add_pass(run, skip, residual, in_place=skip is not x)
            for skip, residual in zip(skips, down_residuals)
        ]
    if unet.mid_block is not None:
        mid = unet.mid_block
        y = resnet_pass(run, [x], mid.resnets[0], conditioning)
        run.release(x, skips)
        x = y
        for transformer, resnet in zip(mid.attentions, mid.resnets[1:]):
            y = transformer_pass(run, x, transformer, conditioning)
            run.release(x, skips)
            x = y
            y = resnet_pass(run, [x], resnet, conditioning)
            run.release(x, skips)
            x = y
    if mid_residual is not None:
        x = add_pass(run, x, mid_residual, in_place=not any(x is skip for skip in skips))

    for index, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, transformer in zip(block.resnets, attentions):
            skip = skips.pop()
            y = resnet_pass(run, [x, skip], resnet, conditioning)
            run.release(x, skips)
            run.release(skip, skips)
            x = y
            if transformer is not None:
                y = transformer_pass(run, x, transformer, conditioning)
                run.release(x, skips)
                x = y
        if getattr(block, "upsamplers", None):
            final = index == len(unet.up_blocks) - 1
            size = tuple(skips[-1].shape[2:]) if sizes_needed and not final else None
            y = conv_pass(run, [x], block.upsamplers[0].conv, mode="up", up_size=size)
            run.release(x, skips)
            x = y
    out = conv_pass(run, [x], unet.conv_out, norm=unet.conv_norm_out, final=True)
    run.release(x, skips)
    run.transfers.finish()
    return out  # type: ignore[return-value]


__all__ = ["walk_unet"]
