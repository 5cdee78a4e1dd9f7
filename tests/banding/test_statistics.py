"""Whole-image GroupNorm statistics merged from parts, against torch's own statistics of the whole tensor."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from linfusion.banding import Moments, merge_moments


def random_bands(height: int, seed: int) -> list[tuple[int, int]]:
    """Consecutive row bands of random heights (1 row up to half the image) covering ``height`` rows."""
    generator = random.Random(seed)
    bands, start = [], 0
    while start < height:
        stop = min(height, start + generator.randint(1, max(1, height // 2)))
        bands.append((start, stop))
        start = stop
    return bands


def by_bands(x: torch.Tensor, bands: list[tuple[int, int]]) -> Moments:
    moments = Moments.empty(x.shape[0], x.shape[1], x.device)
    for start, stop in bands:
        moments.add(x[:, :, start:stop])
    return moments


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance and mean per (sample, channel) of the whole tensor, float64."""
    return torch.var_mean(x.double(), dim=(2, 3), correction=0)


@pytest.mark.parametrize("seed", range(4))
def test_band_by_band_equals_whole_tensor(seed: int) -> None:
    x = torch.randn(2, 5, 23, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3 + 1
    moments = by_bands(x, random_bands(23, seed))
    variance, mean = reference(x)
    assert torch.equal(moments.count, torch.full_like(mean, 23 * 7))
    torch.testing.assert_close(moments.mean, mean, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(moments.m2 / moments.count, variance, rtol=1e-12, atol=0)


def test_huge_mean_small_spread_keeps_the_variance() -> None:
    """Values ~1e6 with spread 1e-3: sums and sums of squares lose the variance, the merged M2 does not."""
    generator = torch.Generator().manual_seed(1)
    x = 1e6 + 1e-3 * torch.randn(1, 3, 40, 9, dtype=torch.float64, generator=generator)
    moments = by_bands(x, random_bands(40, 1))
    variance, mean = reference(x)
    torch.testing.assert_close(moments.m2 / moments.count, variance, rtol=1e-6, atol=0)
    torch.testing.assert_close(moments.mean, mean, rtol=1e-15, atol=0)
    # the numerically weaker form, accumulated band by band in float64, misses by far more than that
    count = x[0, 0].numel()
    sums = sum(x[:, :, a:b].sum(dim=(2, 3)) for a, b in random_bands(40, 1))
    squares = sum(x[:, :, a:b].square().sum(dim=(2, 3)) for a, b in random_bands(40, 1))
    naive = squares / count - (sums / count).square()
    assert ((naive - variance).abs() / variance).max() > 1e-3


def test_parts_merge_in_any_order() -> None:
    generator = torch.Generator().manual_seed(2)
    x = 5e3 + torch.randn(2, 4, 31, 6, dtype=torch.float64, generator=generator)
    parts = [Moments.of(x[:, :, a:b]) for a, b in random_bands(31, 2)]
    assert len(parts) >= 3
    variance, mean = reference(x)
    orders = [parts, parts[::-1], random.Random(3).sample(parts, len(parts))]
    tree = Moments.combine(
        [Moments.combine(parts[: len(parts) // 2]), Moments.combine(parts[len(parts) // 2 :])]
    )
    for merged in [Moments.combine(order) for order in orders] + [tree]:
        torch.testing.assert_close(merged.mean, mean, rtol=1e-14, atol=0)
        torch.testing.assert_close(merged.m2 / merged.count, variance, rtol=1e-10, atol=0)


def test_stacked_parts_of_ranks_reduce_to_the_whole() -> None:
    """Spatial parallelism: each rank's (count, mean, M2) stacked, gathered along a new dim, reduced."""
    x = torch.randn(2, 6, 17, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    stripes = [(0, 4), (4, 12), (12, 17)]  # unequal counts
    gathered = torch.stack([Moments.of(x[:, :, a:b]).stacked() for a, b in stripes])
    assert gathered.shape == (3, 2, 6, 3)
    whole = Moments.from_stacked(gathered).reduce(0)
    variance, mean = reference(x)
    torch.testing.assert_close(whole.mean, mean, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(whole.m2 / whole.count, variance, rtol=1e-12, atol=0)


def test_merge_moments_is_chans_pairwise_formula() -> None:
    """Two parts: the k-way merge equals Chan et al.'s pairwise update, written out independently."""
    count = torch.tensor([[3.0], [8.0]], dtype=torch.float64)
    mean = torch.tensor([[1.5], [-2.0]], dtype=torch.float64)
    m2 = torch.tensor([[0.7], [4.0]], dtype=torch.float64)
    total, merged_mean, merged_m2 = merge_moments(count, mean, m2, dim=0)
    delta = -2.0 - 1.5
    assert total.item() == 11
    assert merged_mean.item() == pytest.approx(1.5 + delta * 8 / 11, rel=1e-15)
    assert merged_m2.item() == pytest.approx(0.7 + 4.0 + delta**2 * 3 * 8 / 11, rel=1e-15)


def test_grouped_and_concatenated_moments() -> None:
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(2, 4, 9, 5, dtype=torch.float64, generator=generator)
    b = 3 + torch.randn(2, 8, 9, 5, dtype=torch.float64, generator=generator)
    joined = Moments.concatenated([Moments.of(a), Moments.of(b)])
    whole = torch.cat([a, b], dim=1)
    grouped = joined.grouped(4)  # 12 channels, 3 per group
    variance, mean = torch.var_mean(whole.reshape(2, 4, -1), dim=-1, correction=0)
    torch.testing.assert_close(grouped.mean, mean, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(grouped.m2 / grouped.count, variance, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="5 groups"):
        joined.grouped(5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_group", [False, True], ids=["per-channel", "per-group"])
def test_normalizer_equals_group_norm_of_the_whole(dtype: torch.dtype, per_group: bool) -> None:
    generator = torch.Generator().manual_seed(6)
    norm = nn.GroupNorm(4, 12, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12, generator=generator))
        norm.bias.copy_(torch.randn(12, generator=generator))
    x = (2 + 3 * torch.randn(2, 12, 19, 6, generator=generator)).to(dtype)
    if per_group:  # as spatial parallelism measures it: per (sample, group) moments of every stripe
        moments = Moments.combine(
            [Moments.of(x[:, :, a:b].reshape(2, 4, -1)) for a, b in random_bands(19, 6)]
        )
    else:
        moments = by_bands(x, random_bands(19, 6))
    normalize = moments.normalizer(norm)
    banded = torch.cat([normalize(x[:, :, a:b]) for a, b in random_bands(19, 7)], dim=2)
    assert banded.dtype == dtype
    expected = F.group_norm(x.double(), 4, norm.weight.double(), norm.bias.double(), norm.eps)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(banded.double(), expected, rtol=tolerance, atol=tolerance)


def test_normalizer_without_affine_on_three_dimensional_parts() -> None:
    """A GroupNorm without affine, on (B, C, tokens) parts, as a VAE attention's norm sees them."""
    x = torch.randn(1, 6, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    norm = nn.GroupNorm(3, 6, affine=False).double()
    moments = Moments.combine([Moments.of(x[:, :, :20]), Moments.of(x[:, :, 20:])])
    torch.testing.assert_close(moments.normalizer(norm)(x), norm(x), rtol=1e-12, atol=1e-12)
    affine = moments.group_norm(norm)
    torch.testing.assert_close(affine.shift, torch.zeros(1, 6, dtype=torch.float64))
