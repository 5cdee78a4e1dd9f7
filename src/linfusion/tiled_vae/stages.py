"""The stages of a pass: one convolution or one ResNet block's second half, streamed over row chunks.

Every convolution keeps the halo rows its next outputs need, so each output row is computed once per
pass and equals what the whole-image convolution computes. A stage takes input rows as they come
(``push``) and returns the output rows it can compute now; ``drained`` says that all were returned.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .statistics import normalize
from .store import RowStore


class ConvStage:
    """One convolution streamed over row chunks; keeps the input rows its next outputs still need."""

    def __init__(self, conv: nn.Conv2d, resample: str, in_height: int, max_rows: int, affine: Any = None):
        self.conv, self.resample, self.affine = conv, resample, affine
        self.max_rows = max_rows  # output rows per push: the drain at the end stays chunk-sized too
        self.halo = conv.kernel_size[0] // 2
        self.in_height = 2 * in_height if resample == "up" else in_height  # rows the conv itself reads
        self.out_height = in_height // 2 if resample == "down" else self.in_height
        self.buffer: torch.Tensor | None = None  # conv input rows [self.kept_from, self.received)
        self.kept_from = self.received = self.produced = 0

    @property
    def drained(self) -> bool:
        return self.produced == self.out_height

    def push(self, rows: torch.Tensor | None, last: bool) -> torch.Tensor | None:
        """Take input rows (``last``: no more will come); return the output rows now computable, if any."""
        if rows is not None:
            rows = normalize(rows, self.affine)
            if self.resample == "up":
                rows = F.interpolate(rows, scale_factor=2.0, mode="nearest")
            self.buffer = rows if self.buffer is None else torch.cat([self.buffer, rows], dim=2)
            self.received += rows.shape[2]
        if last:
            ready = self.out_height
        elif self.resample == "down":  # output row r reads input rows 2r .. 2r + 2
            ready = (self.received - 1) // 2
        else:
            ready = self.received - self.halo
        start = self.produced
        stop = min(ready, self.out_height, start + self.max_rows)
        if stop <= start:
            return None
        weight, bias = self.conv.weight, self.conv.bias
        if self.resample == "down":  # diffusers pads right and bottom by one, then strides by 2
            first, last_row = 2 * start, min(self.in_height, 2 * stop + 1)
            window = F.pad(self._rows(first, last_row), (0, 1, 0, 2 * stop + 1 - last_row))
            out = F.conv2d(window, weight, bias, stride=2)
            keep = 2 * stop
        else:
            halo = self.halo
            first, last_row = max(0, start - halo), min(self.in_height, stop + halo)
            window = self._rows(first, last_row)
            top, bottom = first - (start - halo), (stop + halo) - last_row
            if top or bottom:
                window = F.pad(window, (0, 0, top, bottom))
            out = F.conv2d(window, weight, bias, padding=(0, halo))
            keep = stop - halo
        del window
        self.produced = stop
        self._drop_before(self.in_height if stop == self.out_height else keep)
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

    def __init__(self, store: RowStore | None = None, release: bool = False, device: Any = None):
        self.store, self.release, self.device = store, release, device
        self.buffer: torch.Tensor | None = None
        self.position = 0

    def append(self, rows: torch.Tensor) -> None:
        self.buffer = rows if self.buffer is None else torch.cat([self.buffer, rows], dim=2)

    def take(self, count: int) -> torch.Tensor:
        start, self.position = self.position, self.position + count
        if self.store is not None:
            rows = self.store.read(start, self.position, self.device)
            if self.release:
                self.store.release(self.position)
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


__all__ = ["ConvStage", "ResidualRows", "ResidualStage", "Stage"]
