"""Stage chains: the smallest size a model works at, and the strengths a chain accepts."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from linfusion.pipelines.chain import minimum_side, plan_stages


def shaped(down_blocks: int, vae_scale_factor: int) -> SimpleNamespace:
    unet = SimpleNamespace(config=SimpleNamespace(down_block_types=("CrossAttnDownBlock2D",) * down_blocks))
    return SimpleNamespace(unet=unet, vae_scale_factor=vae_scale_factor)


@pytest.mark.parametrize(("down_blocks", "factor", "expected"), [(4, 8, 64), (3, 8, 32), (3, 2, 8)])
def test_minimum_side_leaves_one_latent_row_at_the_deepest_level(
    down_blocks: int, factor: int, expected: int
) -> None:
    """SD-1.x/2.x: 4 levels, VAE x8 -> 64 px; SD-XL: 3 levels -> 32 px; the bundled model: 3 levels, x2 -> 8 px."""
    assert minimum_side(shaped(down_blocks, factor)) == expected


def test_bundled_model_minimum_side() -> None:
    from linfusion.bundled import load_pipeline

    assert minimum_side(load_pipeline()) == 8


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_strengths_outside_zero_one_are_refused(strength: float) -> None:
    with pytest.raises(ValueError, match=r"strengths must be in \(0, 1\]"):
        plan_stages(128, 128, 32, strengths=[0.4, strength])
