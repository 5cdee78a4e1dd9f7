"""The UNet's convolutional layers band by band: a convolution with its GroupNorm and SiLU in front (plain,
stride-2 down, nearest-x2 up), a ResNet block as two of them, and an added ControlNet residual.

Every convolution reads its band plus the halo rows it needs (:mod:`linfusion.banding.rows`), so it
computes exactly what the whole convolution computes; every GroupNorm normalizes with the whole-image
statistics its stored input gathered while it was written.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...banding import ConvRows, Moments, StoredActivation, band_ranges, estimate_band_rows
from .schedule import BandRun, Conditioning, conv_flops, linear_flops


def resnet_pass(
    run: BandRun,
    inputs: list[StoredActivation],
    resnet: nn.Module,
    conditioning: Conditioning,
    parked: bool = False,
) -> StoredActivation:
    """A ``ResnetBlock2D`` over ``cat(inputs)``: two convolution passes, the second adding the shortcut."""
    bias = None
    if resnet.time_emb_proj is not None:
        emb = conditioning.emb if resnet.skip_time_act else resnet.nonlinearity(conditioning.emb)
        bias = resnet.time_emb_proj(emb)[:, :, None, None]
        run.count(linear_flops(resnet.time_emb_proj, emb.shape[0]))
    hidden = conv_pass(run, inputs, resnet.conv1, norm=resnet.norm1, bias=bias)
    out = conv_pass(
        run,
        [hidden],
        resnet.conv2,
        norm=resnet.norm2,
        residual=inputs,
        shortcut=resnet.conv_shortcut,
        scale=resnet.output_scale_factor,
        parked=parked,
    )
    run.store.release(hidden)
    return out  # type: ignore[return-value]


def conv_pass(
    run: BandRun,
    inputs: list[StoredActivation],
    conv: nn.Conv2d,
    *,
    norm: nn.GroupNorm | None = None,
    mode: str = "same",
    up_size: tuple[int, int] | None = None,
    bias: torch.Tensor | None = None,
    residual: list[StoredActivation] | None = None,
    shortcut: nn.Module | None = None,
    scale: float = 1.0,
    parked: bool = False,
    final: bool = False,
) -> StoredActivation | torch.Tensor:
    """``conv(silu(norm(cat(inputs))))`` (``conv(cat(inputs))`` without ``norm``) band by band.

    ``bias`` (B, C, 1, 1) is added to the conv output (the ResNet's time embedding); ``residual`` makes
    it ``(shortcut(cat(residual)) + .) / scale``. ``mode``: "same" (stride 1), "down" (diffusers'
    stride-2 downsampler), "up" (nearest upsampling to ``up_size``, default twice the size, then the
    conv). ``final`` writes an NCHW tensor on the compute device instead of the store.
    """
    batch, _, height, width = inputs[0].shape
    kernel, padding, stride = conv.kernel_size[0], conv.padding[0], conv.stride[0]
    if mode == "up":
        out_height, out_width = up_size or (2 * height, 2 * width)
        rules = ConvRows.upsampled(conv, height, out_height, out_width, by_size=up_size is not None)
    else:
        out_height = (height + 2 * padding - kernel) // stride + 1
        out_width = (width + 2 * padding - kernel) // stride + 1
        rules = ConvRows(conv, height)
    normalize = None
    if norm is not None:
        normalize = Moments.concatenated([x.moments for x in inputs]).normalizer(norm)  # type: ignore[misc]
    shape = (batch, conv.out_channels, out_height, out_width)
    out: Any = run.store.scratch(shape, run.dtype) if final else run.new(shape, parked)
    flops = conv_flops(conv, batch, out_height, out_width)
    if shortcut is not None:
        flops += conv_flops(shortcut, batch, out_height, out_width)
    run.count(flops)
    rows = estimate_band_rows(run.band_bytes, batch * (conv.in_channels + conv.out_channels), out_width)

    def fetch(start: int, stop: int) -> Any:
        low, high = rules.stored_rows(start, stop)
        fetched = [run.transfers.fetch(x, low, high) for x in inputs]
        if residual is not None:
            fetched += [run.transfers.fetch(x, start, stop) for x in residual]
        return fetched

    def body(start: int, stop: int, fetched: list[torch.Tensor]) -> None:
        parts, skip_parts = fetched[: len(inputs)], fetched[len(inputs) :]
        band = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if normalize is not None:
            band = F.silu(normalize(band), inplace=True).to(run.dtype)
        band = rules.input_band(band, start, stop)
        result = rules.convolve(band, start, stop)
        del band
        if bias is not None:
            result = result + bias
        if skip_parts:
            skip = skip_parts[0] if len(skip_parts) == 1 else torch.cat(skip_parts, dim=1)
            if shortcut is not None:
                skip = shortcut(skip)
            result = (skip + result) / scale
        if final:
            out[:, :, start:stop] = result
        else:
            run.write(out, start, stop, result)

    run.passes_over(band_ranges(out_height, rows), fetch, body)
    return out


def add_pass(run: BandRun, x: StoredActivation, residual: torch.Tensor, in_place: bool) -> StoredActivation:
    """``x + residual`` (a ControlNet residual, a whole tensor on any device), band by band."""
    batch, channels, height, width = x.shape
    out = x if in_place else run.new(x.shape, parked=x.parked)
    if in_place:
        out.moments = Moments.empty(batch, channels, run.device)
    rows = estimate_band_rows(run.band_bytes, 2 * batch * channels, width)

    def fetch(start: int, stop: int) -> Any:
        return [run.transfers.fetch(x, start, stop)]

    def body(start: int, stop: int, fetched: list[torch.Tensor]) -> None:
        run.write(out, start, stop, fetched[0] + residual[:, :, start:stop].to(run.device))

    run.passes_over(band_ranges(height, rows), fetch, body)
    return out


__all__ = ["add_pass", "conv_pass", "resnet_pass"]
