"""The stages of a pass: one convolution or one ResNet block's second half, streamed over row chunks.

Every convolution keeps the halo rows its next outputs need, so each output row is computed once per
pass and equals what the whole-image convolution computes: the rows an output band reads, and the
convolution over them, are the row rules of :mod:`linfusion.banding` (:func:`~linfusion.banding.conv_window`,
:func:`~linfusion.banding.convolve_band`). A stage takes input rows as they come (``push``) and returns
the output rows it can compute now; ``drained`` says that all were returned.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..banding import RowBlocks, RowWindow, conv_window, convolve_band

Normalizer = Callable[[torch.Tensor], torch.Tensor]


class ConvStage:
    """One convolution streamed over row chunks; keeps the input rows its next outputs still need.

    ``normalize`` (a GroupNorm with whole-image statistics, :meth:`linfusion.banding.Moments.normalizer`)
    then SiLU run on the incoming rows first; ``resample`` "up" doubles them (nearest x2 repeats each row, so
    upsampling a chunk gives exactly its rows of the upsampled image), "down" is diffusers' downsampler (one
    zero row and column on the bottom and right, stride 2).
    """

    def __init__(self, conv: nn.Conv2d, resample: str, in_height: int, max_rows: int,
                 normalize: Normalizer | None = None):  # fmt: skip
        self.conv, self.resample, self.normalize = conv, resample, normalize
        self.max_rows = max_rows  # output rows per push: the drain at the end stays chunk-sized too
        self.kernel = conv.kernel_size[0]
        down = resample == "down"
        self.stride, self.padding = (2, 0) if down else (1, self.kernel // 2)
        self.columns = (0, 1) if down else None
        self.in_height = 2 * in_height if resample == "up" else in_height  # rows the conv itself reads
        self.out_height = in_height // 2 if down else self.in_height
        self.buffer: torch.Tensor | None = None  # conv input rows [self.kept_from, self.received)
        self.kept_from = self.received = self.produced = 0

    @property
    def drained(self) -> bool:
        return self.produced == self.out_height

    def _window(self, start: int, stop: int) -> RowWindow:
        return conv_window(
            start,
            stop,
            kernel=self.kernel,
            stride=self.stride,
            padding=self.padding,
            in_height=self.in_height,
        )

    def push(self, rows: torch.Tensor | None, last: bool) -> torch.Tensor | None:
        """Take input rows (``last``: no more will come); return the output rows now computable, if any."""
        if rows is not None:
            if self.normalize is not None:
                rows = F.silu(self.normalize(rows), inplace=True).to(rows.dtype)
            if self.resample == "up":
                rows = F.interpolate(rows, scale_factor=2.0, mode="nearest")
            self.buffer = rows if self.buffer is None else torch.cat([self.buffer, rows], dim=2)
            self.received += rows.shape[2]
        # the output rows whose window ends within the rows received (all of them after the last push)
        ready = self.out_height if last else (self.received + self.padding - self.kernel) // self.stride + 1
        start = self.produced
        stop = min(ready, self.out_height, start + self.max_rows)
        if stop <= start:
            return None
        window = self._window(start, stop)
        out = convolve_band(self._rows(window.low, window.high), self.conv, window, self.columns)
        self.produced = stop
        self._drop_before(self.in_height if stop == self.out_height else self._window(stop, stop + 1).first)
        return out

    def _rows(self, first: int, stop: int) -> torch.Tensor:
        assert self.buffer is not None and first >= self.kept_from
        return self.buffer[:, :, first - self.kept_from : stop - self.kept_from]

    def _drop_before(self, row: int) -> None:
        if self.buffer is None or row <= self.kept_from:
            return
        rest = self.buffer[:, :, row - self.kept_from :]
        self.buffer = rest.clone() if rest.shape[2] else None  # a copy: the old chunk is freed
        self.kept_from = row


class ResidualRows:
    """The residual rows a ResNet block's second conv adds: buffered as they pass, or read from the store."""

    def __init__(self, store: RowBlocks | None = None, release: bool = False):
        self.store, self.release = store, release
        self.buffer: torch.Tensor | None = None
        self.position = 0

    def append(self, rows: torch.Tensor) -> None:
        self.buffer = rows if self.buffer is None else torch.cat([self.buffer, rows], dim=2)

    def take(self, count: int) -> torch.Tensor:
        start, self.position = self.position, self.position + count
        if self.store is not None:
            rows = self.store.read(start, self.position)
            if self.release:
                self.store.release_before(self.position)
            return rows
        assert self.buffer is not None
        rows, rest = self.buffer[:, :, :count], self.buffer[:, :, count:]
        self.buffer = rest.clone() if rest.shape[2] else None
        return rows


class ResidualStage:
    """A ResNet block's second half: ``(shortcut(residual) + conv2(silu(norm2(h)))) / output_scale``."""

    def __init__(self, conv: ConvStage, block: nn.Module, residual: ResidualRows):
        self.conv, self.block, self.residual = conv, block, residual

    @property
    def drained(self) -> bool:
        return self.conv.drained

    def push(self, rows: torch.Tensor | None, last: bool) -> torch.Tensor | None:
        out = self.conv.push(rows, last)
        if out is None:
            return None
        residual = self.residual.take(out.shape[2])
        if self.block.conv_shortcut is not None:
            residual = self.block.conv_shortcut(residual)
        out = residual + out
        if self.block.output_scale_factor != 1:
            out = out / self.block.output_scale_factor
        return out


Stage = ConvStage | ResidualStage


__all__ = ["ConvStage", "Normalizer", "ResidualRows", "ResidualStage", "Stage"]
