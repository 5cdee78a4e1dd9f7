"""A convolution streamed over row chunks equals the whole-image convolution, for every resampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linfusion.banding import Moments
from linfusion.tiled_vae.stages import ConvStage


def streamed(stage: ConvStage, rows: torch.Tensor, chunk_sizes: list[int]) -> torch.Tensor:
    """Push ``rows`` in chunks of the given sizes (repeating the last), then drain the stage."""
    outputs, start, sizes = [], 0, iter(chunk_sizes)
    height = rows.shape[2]
    size = 1
    while not stage.drained:
        chunk = None
        if start < height:
            size = next(sizes, size)
            chunk, start = rows[:, :, start : start + size], min(height, start + size)
        out = stage.push(chunk, start == height)
        if out is not None:
            assert out.shape[2] <= stage.max_rows
            outputs.append(out)
    return torch.cat(outputs, dim=2)


@pytest.mark.parametrize("resample", ["same", "up", "down"])
@pytest.mark.parametrize("height", [13, 8])
def test_streamed_conv_equals_the_whole_image_conv(resample: str, height: int) -> None:
    conv = torch.nn.Conv2d(
        4, 6, 3, padding=0 if resample == "down" else 1, stride=2 if resample == "down" else 1
    )
    rows = torch.randn(2, 4, height, 7)
    with torch.no_grad():
        if resample == "up":
            expected = conv(F.interpolate(rows, scale_factor=2.0, mode="nearest"))
        elif resample == "down":
            expected = conv(F.pad(rows, (0, 1, 0, 1)))
        else:
            expected = conv(rows)
        actual = streamed(ConvStage(conv, resample, height, max_rows=3), rows, [1, 4, 2, 5])
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_streamed_conv_normalizes_its_rows_first(dtype: torch.dtype, tolerance: float) -> None:
    """With whole-image statistics, ``conv(silu(norm(rows)))`` streamed equals the whole-image layer; the
    rows keep their dtype (the normalization runs in float32)."""
    norm = torch.nn.GroupNorm(2, 4, eps=1e-6)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    rows = (torch.randn(2, 4, 9, 7) * 3 + 5).to(dtype)
    with torch.no_grad():
        expected = conv(F.silu(norm(rows.float())).to(dtype)).float()
        stage = ConvStage(conv, "same", 9, max_rows=2, normalize=Moments.of(rows).normalizer(norm))
        actual = streamed(stage, rows, [3, 1, 5])
    assert actual.dtype == dtype
    assert (actual.float() - expected).abs().max().item() <= tolerance
