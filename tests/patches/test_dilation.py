"""DemoFusion's dilation patches: what a dilated convolution computes, the schedule, the blur, exact undo."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from linfusion.patches.dilation import apply_dilation, cosine_factor, gaussian_blur


def test_dilated_convolution_is_the_plain_one_on_each_strided_sub_lattice() -> None:
    """Why branch (b) works: a conv dilated by s sees, at every output pixel, the s-strided sub-image
    through that pixel, exactly as DemoFusion's dilated sampling of sub-latents does."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 12, 18)
    scale = 3
    with apply_dilation(conv, scale):
        assert conv.dilation == (3, 3) and conv.padding == (3, 3)
        dilated = conv(x)
    assert conv.dilation == (1, 1) and conv.padding == (1, 1)
    for a in range(scale):
        for b in range(scale):
            expected = conv(x[..., a::scale, b::scale])
            torch.testing.assert_close(dilated[..., a::scale, b::scale], expected, rtol=0, atol=1e-5)


def test_cosine_weights() -> None:
    assert cosine_factor(1000) == pytest.approx(1.0)
    assert cosine_factor(0) == pytest.approx(0.0)
    assert cosine_factor(torch.tensor([500])) == pytest.approx(0.5)
    assert cosine_factor(250) == pytest.approx((1 + math.cos(math.pi * 0.75)) / 2)


def test_gaussian_blur_against_a_two_dimensional_kernel() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 20)
    kernel_size, sigma = 5, 0.9
    offsets = torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = torch.outer(g, g) / torch.outer(g, g).sum()
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    reference = F.conv2d(padded, kernel.expand(4, 1, -1, -1).contiguous(), groups=4)
    mean_x, std_x = x.mean(dim=(1, 2, 3), keepdim=True), x.std(dim=(1, 2, 3), keepdim=True)
    reference = (reference - reference.mean(dim=(1, 2, 3), keepdim=True)) / reference.std(
        dim=(1, 2, 3), keepdim=True
    ) * std_x + mean_x
    torch.testing.assert_close(gaussian_blur(x, kernel_size, sigma), reference, rtol=0, atol=1e-5)
    assert gaussian_blur(x, 1, sigma) is x
