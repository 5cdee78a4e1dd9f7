"""Row bands and the rows a layer reads: what every banding engine needs to compute a layer band by band.

A convolution over output rows ``[start, stop)`` reads input rows ``[start * stride - padding,
(stop - 1) * stride - padding + kernel)``: its band plus halo rows, with zero rows wherever that window
passes the image border (:func:`conv_window`, :func:`convolve_band`). It then computes exactly what the
whole convolution computes on those rows, for stride 1 and for stride-2 downsamplers alike. A nearest
upsampler maps each output row to one source row by the interpolation's own rule
(:func:`nearest_source_rows`), so an upsampled band needs only the source rows its rows map to
(:func:`upsample_band`). :class:`ConvRows` chains these rules for one convolution (after an optional
upsampling): the stored rows a band reads, and the band computed from them. :func:`band_conv_problem` says
which convolutions these rules cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def band_ranges(height: int, rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of consecutive bands of at most ``rows`` rows covering ``height`` rows."""
    if rows < 1:
        raise ValueError(f"a band needs at least one row; got {rows}")
    return [(start, min(height, start + rows)) for start in range(0, height, rows)]


def estimate_band_rows(band_bytes: int, channels: int, width: int) -> int:
    """Rows of a ``channels`` x ``width`` layer that fit ``band_bytes`` at about six float32 copies.

    A rough single-layer rule for engines that size bands per layer without tracing them.
    """
    return max(1, band_bytes // (channels * width * 4 * 6))


class RowWindow(NamedTuple):
    """The input rows one output band reads: ``[first, last)`` (may pass the border) and ``[low, high)``,
    the part inside the image; the rest are zero rows."""

    first: int
    last: int
    low: int
    high: int

    @property
    def zeros_above(self) -> int:
        return self.low - self.first

    @property
    def zeros_below(self) -> int:
        return self.last - self.high


def conv_window(
    start: int, stop: int, *, kernel: int, stride: int, padding: int, in_height: int
) -> RowWindow:
    """The input rows a convolution (``kernel`` rows, ``stride``, ``padding`` zero rows on top) reads to
    compute its output rows ``[start, stop)`` from an input of ``in_height`` rows."""
    first = start * stride - padding
    last = (stop - 1) * stride - padding + kernel
    return RowWindow(first, last, max(first, 0), min(last, in_height))


def convolve_band(
    band: torch.Tensor, conv: nn.Conv2d, window: RowWindow, columns: tuple[int, int] | None = None
) -> torch.Tensor:
    """``conv`` over input rows ``[window.low, window.high)`` (``band``): the output rows whose window it is.

    Zero rows stand for the rows past the border. The columns keep the convolution's own padding, or get
    ``columns`` = (left, right) zero columns instead (a VAE downsampler pads only on the right).
    """
    left, right = (0, 0) if columns is None else columns
    if window.zeros_above or window.zeros_below or left or right:
        band = F.pad(band, (left, right, window.zeros_above, window.zeros_below))
    padding = (0, conv.padding[1] if columns is None else 0)
    return F.conv2d(band, conv.weight, conv.bias, stride=conv.stride, padding=padding)


def nearest_source_rows(height: int, out_height: int, by_size: bool) -> list[int]:
    """Source row of every output row of nearest upsampling from ``height`` to ``out_height`` rows, by the
    interpolation itself: ``by_size`` as ``F.interpolate(size=...)``, else ``scale_factor=2``."""
    index = torch.arange(height, dtype=torch.float32, device="cpu").view(1, 1, height, 1)
    if by_size:
        mapped = F.interpolate(index, size=(out_height, 1), mode="nearest")
    else:
        mapped = F.interpolate(index, scale_factor=2.0, mode="nearest")
    return [int(row) for row in mapped[0, 0, :, 0].tolist()]


def source_span(source_rows: list[int], low: int, high: int) -> tuple[int, int]:
    """The source rows ``[first, stop)`` that upsampled rows ``[low, high)`` are copies of."""
    return source_rows[low], source_rows[high - 1] + 1


def upsample_band(
    band: torch.Tensor, source_rows: list[int], low: int, high: int, out_width: int
) -> torch.Tensor:
    """Upsampled rows ``[low, high)`` (``out_width`` wide) from ``band``, the source rows of
    :func:`source_span`: each row picked by ``source_rows``, the columns by nearest interpolation."""
    local = [row - source_rows[low] for row in source_rows[low:high]]
    band = band.index_select(2, torch.tensor(local, device=band.device))
    return F.interpolate(band, size=(high - low, out_width), mode="nearest")


@dataclass(frozen=True)
class ConvRows:
    """The row rules of one convolution over ``in_height`` rows, read from a stored input: the stored rows
    an output band reads (:meth:`stored_rows`), its input rows from them (:meth:`input_band`) and the band
    computed from those (:meth:`convolve`; two steps, so that the stored rows can be freed in between).

    With ``source_rows`` (:meth:`upsampled`) the convolution reads a nearest upsampling of the stored input
    to ``in_height`` x ``upsampled_width``; a band then reads only the stored rows its rows copy.
    """

    conv: nn.Conv2d
    in_height: int
    source_rows: list[int] | None = None
    upsampled_width: int = 0

    @classmethod
    def upsampled(
        cls, conv: nn.Conv2d, height: int, out_height: int, out_width: int, by_size: bool
    ) -> ConvRows:
        """``conv`` after nearest upsampling from ``height`` rows to ``out_height`` x ``out_width``
        (``by_size``: as ``F.interpolate(size=...)``, else ``scale_factor=2``)."""
        return cls(conv, out_height, nearest_source_rows(height, out_height, by_size), out_width)

    def window(self, start: int, stop: int) -> RowWindow:
        """The rows of the convolution's input (upsampled, if so) that output rows ``[start, stop)`` read."""
        kernel, stride, padding = self.conv.kernel_size[0], self.conv.stride[0], self.conv.padding[0]
        return conv_window(
            start, stop, kernel=kernel, stride=stride, padding=padding, in_height=self.in_height
        )

    def stored_rows(self, start: int, stop: int) -> tuple[int, int]:
        """The stored input rows ``[low, high)`` that output rows ``[start, stop)`` read."""
        window = self.window(start, stop)
        if self.source_rows is None:
            return window.low, window.high
        return source_span(self.source_rows, window.low, window.high)

    def input_band(self, stored: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The convolution's input rows for output rows ``[start, stop)`` from ``stored``, the rows of
        :meth:`stored_rows`: upsampled when the convolution reads an upsampling, else ``stored`` itself."""
        if self.source_rows is None:
            return stored
        window = self.window(start, stop)
        return upsample_band(stored, self.source_rows, window.low, window.high, self.upsampled_width)

    def convolve(self, band: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Output rows ``[start, stop)`` from ``band``, their :meth:`input_band`."""
        return convolve_band(band, self.conv, self.window(start, stop))


def band_conv_problem(conv: Any, stride: int = 1, padding: int | None = None) -> str | None:
    """What keeps ``conv`` from running band by band with :func:`convolve_band`, or None.

    Supported: a plain ``nn.Conv2d`` (no LoRA wrapper), square odd kernel, no dilation or groups, zero
    padding of ``padding`` rows and columns on each side (default ``kernel // 2``), ``stride``.
    """
    if type(conv) is not nn.Conv2d:
        return f"a {type(conv).__name__} (plain Conv2d only; fuse LoRA first)"
    kernel = conv.kernel_size
    if not (kernel[0] == kernel[1] and kernel[0] % 2 == 1 and conv.dilation == (1, 1) and conv.groups == 1):
        return f"kernel {kernel}, dilation {conv.dilation}, groups {conv.groups}"
    expected = kernel[0] // 2 if padding is None else padding
    if isinstance(conv.padding, str) or conv.padding != (expected,) * 2 or conv.padding_mode != "zeros":
        return f"padding {conv.padding!r} ({conv.padding_mode}); only symmetric zero padding of {expected}"
    if conv.stride != (stride, stride):
        return f"stride {conv.stride}"
    return None


__all__ = [
    "ConvRows",
    "RowWindow",
    "band_conv_problem",
    "band_ranges",
    "conv_window",
    "convolve_band",
    "estimate_band_rows",
    "nearest_source_rows",
    "source_span",
    "upsample_band",
]
