"""Row rules: a convolution computed band by band from its halo rows equals the whole convolution (stride 1,
stride 2, after nearest upsampling, through :class:`ConvRows` and through the rules it chains); the supported
convolutions; band ranges and sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from linfusion.banding import (
    ConvRows,
    band_conv_problem,
    band_ranges,
    conv_window,
    convolve_band,
    estimate_band_rows,
)


def conv(kernel: int, stride: int = 1, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(3, 4, kernel, stride=stride, padding=kernel // 2).double()


def banded(rules: ConvRows, x: torch.Tensor, out_height: int, rows: int) -> torch.Tensor:
    """The layer's output rows computed band by band, each from the stored rows ``rules`` say it reads."""
    parts = []
    for start, stop in band_ranges(out_height, rows):
        low, high = rules.stored_rows(start, stop)
        parts.append(rules.convolve(rules.input_band(x[:, :, low:high], start, stop), start, stop))
    return torch.cat(parts, dim=2)


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("rows", [1, 2, 5, 100])
def test_stride_one_bands_reproduce_the_whole_conv(kernel: int, rows: int) -> None:
    layer = conv(kernel)
    x = torch.randn(2, 3, 13, 9, dtype=torch.float64)
    expected = layer(x)
    torch.testing.assert_close(banded(ConvRows(layer, 13), x, 13, rows), expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("height", [12, 13])
@pytest.mark.parametrize("rows", [1, 3, 100])
def test_stride_two_downsampler_bands_reproduce_the_whole_conv(height: int, rows: int) -> None:
    layer = conv(3, stride=2)  # diffusers' UNet downsampler: 3x3, stride 2, padding 1
    x = torch.randn(1, 3, height, 8, dtype=torch.float64)
    expected = layer(x)
    assert expected.shape[2] == (height + 1) // 2
    result = banded(ConvRows(layer, height), x, expected.shape[2], rows)
    torch.testing.assert_close(result, expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("height", [8, 9])
def test_right_and_bottom_padded_downsampler_bands_reproduce_the_whole_conv(height: int) -> None:
    """A VAE encoder's downsampler: no padding in the conv, one zero row and column after the image."""
    torch.manual_seed(1)
    layer = nn.Conv2d(3, 4, 3, stride=2, padding=0).double()
    x = torch.randn(1, 3, height, 7, dtype=torch.float64)
    expected = layer(F.pad(x, (0, 1, 0, 1)))
    parts = []
    for start, stop in band_ranges(expected.shape[2], 2):
        window = conv_window(start, stop, kernel=3, stride=2, padding=0, in_height=height)
        parts.append(convolve_band(x[:, :, window.low : window.high], layer, window, columns=(0, 1)))
    torch.testing.assert_close(torch.cat(parts, dim=2), expected, rtol=1e-13, atol=1e-13)


def test_window_reads_halo_rows_and_zero_rows_past_the_border() -> None:
    top = conv_window(0, 4, kernel=3, stride=1, padding=1, in_height=10)
    assert (top.first, top.last, top.low, top.high, top.zeros_above, top.zeros_below) == (-1, 5, 0, 5, 1, 0)
    bottom = conv_window(8, 10, kernel=3, stride=1, padding=1, in_height=10)
    assert (bottom.low, bottom.high, bottom.zeros_above, bottom.zeros_below) == (7, 10, 0, 1)
    down = conv_window(2, 4, kernel=3, stride=2, padding=1, in_height=7)  # output rows 2, 3 read 3 .. 7
    assert (down.first, down.last, down.low, down.high, down.zeros_below) == (3, 8, 3, 7, 1)


@pytest.mark.parametrize(("height", "out_height", "by_size"), [(5, 10, False), (4, 7, True), (6, 13, True)])
@pytest.mark.parametrize("rows", [1, 4, 100])
def test_upsample_rule_reproduces_interpolate_then_conv(
    height: int, out_height: int, by_size: bool, rows: int
) -> None:
    """Nearest x2 (or to a given size, as diffusers' ``upsample_size``) then a 3x3 conv, band by band
    from only the source rows each band's window maps to."""
    layer = conv(3)
    x = torch.randn(2, 3, height, 5, dtype=torch.float64)
    out_width = 10
    if by_size:
        upsampled = F.interpolate(x, size=(out_height, out_width), mode="nearest")
    else:
        upsampled = F.interpolate(x, scale_factor=2.0, mode="nearest")
    expected = layer(upsampled)
    rules = ConvRows.upsampled(layer, height, out_height, out_width, by_size=by_size)
    source_rows = rules.source_rows
    assert source_rows is not None
    assert len(source_rows) == out_height and source_rows[0] == 0 and source_rows[-1] == height - 1
    for start, stop in band_ranges(out_height, rows):
        window = rules.window(start, stop)
        first, last = rules.stored_rows(start, stop)
        assert last - first <= (window.high - window.low + 1) // 2 + 1  # only the rows it needs
    result = banded(rules, x, out_height, rows)
    torch.testing.assert_close(result, expected, rtol=1e-13, atol=1e-13)


class LoRAConv(nn.Conv2d):
    pass


def test_band_conv_problem_names_what_is_unsupported() -> None:
    assert band_conv_problem(nn.Conv2d(2, 2, 3, padding=1)) is None
    assert band_conv_problem(nn.Conv2d(2, 2, 3, stride=2, padding=1), stride=2) is None
    assert band_conv_problem(nn.Conv2d(2, 2, 3, stride=2), stride=2, padding=0) is None  # a VAE downsampler
    assert "LoRAConv" in band_conv_problem(LoRAConv(2, 2, 3, padding=1))
    assert "dilation" in band_conv_problem(nn.Conv2d(2, 2, 3, padding=2, dilation=2))
    assert "groups 2" in band_conv_problem(nn.Conv2d(2, 2, 3, padding=1, groups=2))
    assert "kernel (2, 2)" in band_conv_problem(nn.Conv2d(2, 2, 2))
    assert "reflect" in band_conv_problem(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    assert "'same'" in band_conv_problem(nn.Conv2d(2, 2, 3, padding="same"))
    assert "padding (0, 0)" in band_conv_problem(nn.Conv2d(2, 2, 3))
    assert "stride (2, 2)" in band_conv_problem(nn.Conv2d(2, 2, 3, stride=2, padding=1))


def test_band_ranges_and_band_rows() -> None:
    assert band_ranges(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert band_ranges(7, 100) == [(0, 7)]
    with pytest.raises(ValueError, match="at least one row"):
        band_ranges(7, 0)
    assert estimate_band_rows(10 * 2**20, 64, 128) == 10 * 2**20 // (64 * 128 * 24)
    assert estimate_band_rows(1, 64, 128) == 1  # never less than a row
