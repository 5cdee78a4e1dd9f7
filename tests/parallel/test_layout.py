"""Single-process parts of spatial parallelism: stripe layout, halo plans, the split attention state,
and the patches on a world of one (no process group)."""

from __future__ import annotations

import pytest
import torch

from linfusion.model import LinFusion
from linfusion.ops import linear_attention_from_state, linear_attention_reference, linear_attention_state
from linfusion.parallel import (
    StripeLayoutError,
    bounds_at,
    downsampling_factor,
    spatial_parallel,
    stripe_bounds,
)
from linfusion.parallel.patch import _conv_plan
from linfusion.testing import tiny_unet


def test_stripes_start_at_multiples_of_the_downsampling_and_cover_the_latent() -> None:
    assert stripe_bounds(13, 3, 2) == [(0, 4), (4, 8), (8, 13)]
    assert stripe_bounds(20, 3, 2) == [(0, 6), (6, 14), (14, 20)]
    assert stripe_bounds(64, 4, 8) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert stripe_bounds(17, 2, 8) == [(0, 8), (8, 17)]
    assert stripe_bounds(9, 2, 8) == [(0, 8), (8, 9)]  # the shortest possible last stripe
    for height in range(9, 70):
        bounds = stripe_bounds(height, 3, 4)
        assert bounds[0][0] == 0 and bounds[-1][1] == height
        assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:]))
        assert all(start % 4 == 0 and stop > start for start, stop in bounds)


def test_too_short_latent_names_the_minimum_height() -> None:
    with pytest.raises(StripeLayoutError, match="at least 17 rows"):
        stripe_bounds(16, 3, 8)


def test_bounds_at_lower_and_higher_resolutions() -> None:
    bounds = stripe_bounds(13, 3, 4)
    assert bounds == [(0, 4), (4, 8), (8, 13)]
    assert bounds_at(bounds, 7, 13) == [(0, 2), (2, 4), (4, 7)]  # ceil(13 / 2)
    assert bounds_at(bounds, 4, 13) == [(0, 1), (1, 2), (2, 4)]
    assert bounds_at(bounds, 104, 13) == [(0, 32), (32, 64), (64, 104)]  # pixel space, x8
    with pytest.raises(ValueError, match="not a downsampled level"):
        bounds_at(bounds, 5, 13)


def test_downsampling_factor_of_tiny_unets() -> None:
    assert downsampling_factor(tiny_unet("sd15")) == 2
    assert downsampling_factor(tiny_unet("sdxl")) == 2


def test_halo_plan_for_same_size_and_strided_convolutions() -> None:
    # (zeros_top, recv_up, trim, recv_down, zeros_bottom, send_up, send_down) per rank
    same = _conv_plan((4, 4, 5), 3, 1, 1, 1)
    assert same == ((1, 0, 0, 1, 0, 0, 1), (0, 1, 0, 1, 0, 1, 1), (0, 1, 0, 0, 1, 1, 0))
    strided = _conv_plan((4, 4, 5), 3, 2, 1, 1)  # rows 2i-1..2i+1: only the row above is needed
    assert strided == ((1, 0, 0, 0, 0, 0, 1), (0, 1, 0, 0, 0, 0, 1), (0, 1, 0, 0, 1, 0, 0))
    with pytest.raises(StripeLayoutError, match="not a multiple of a convolution's stride 2"):
        _conv_plan((3, 4), 3, 2, 1, 1)


def test_state_of_parts_sums_to_the_whole() -> None:
    q, k, v = (torch.randn(2, 3, 50, 8) for _ in range(3))
    parts = [
        linear_attention_state(k[:, :, a:b], v[:, :, a:b], total_tokens=50)
        for a, b in ((0, 13), (13, 31), (31, 50))
    ]
    state = sum(part[0] for part in parts)
    key_mean = sum(part[1] for part in parts)
    split = linear_attention_from_state(q, state, key_mean)
    assert (split - linear_attention_reference(q, k, v)).abs().max() < 1e-6
    whole_state, whole_mean = linear_attention_state(k, v)
    assert torch.equal(
        linear_attention_from_state(q, whole_state, whole_mean), linear_attention_reference(q, k, v)
    )


def test_world_of_one_matches_and_restores_even_after_an_error() -> None:
    unet = tiny_unet("sd15")
    linfusion = LinFusion.from_unet(unet, init="random")
    linfusion.mount(unet)
    sample, context = torch.randn(1, 4, 10, 8), torch.randn(1, 7, 32)
    with torch.no_grad():
        reference = unet(sample, 10, context).sample
        with spatial_parallel(unet) as patches:
            patched = unet(sample, 10, context).sample
        assert patches.patched["conv"] > 0 and patches.patched["groupnorm"] > 0
        assert patches.patched["linear_attention"] == len(linfusion.modules_dict) == 7
        assert (patched - reference).abs().max() < 1e-5
        with pytest.raises(RuntimeError, match="boom"), spatial_parallel(unet):
            raise RuntimeError("boom")
    assert not any("forward" in module.__dict__ or "attend" in module.__dict__ for module in unet.modules())
    with torch.no_grad():
        assert torch.equal(unet(sample, 10, context).sample, reference)
