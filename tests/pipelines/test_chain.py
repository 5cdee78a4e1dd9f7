"""Stage chains: progress-bar settings reach every stage, step counts, the smallest size a model works at,
and the strengths a chain accepts."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from linfusion.pipelines import sdedit
from linfusion.pipelines.chain import Stage, denoising_steps, minimum_side, plan_stages
from linfusion.testing import tiny_pipeline


@pytest.mark.parametrize("disable", [True, False])
def test_every_stage_follows_the_pipelines_progress_bar_setting(
    disable: bool, capfd: pytest.CaptureFixture
) -> None:
    pipe = tiny_pipeline("sd15")
    pipe.set_progress_bar_config(disable=disable)
    capfd.readouterr()
    image = sdedit(pipe, "a red circle", 64, 64, num_inference_steps=4)  # 32 px base, then 64 px img2img
    err = capfd.readouterr().err
    assert image.size == (64, 64)
    if disable:
        assert "stage " not in err and "it/s" not in err, err
    else:
        assert "stage 1/2 32x32" in err and "stage 2/2 64x64" in err


def test_denoising_steps_are_what_img2img_runs_and_demofusion_doubles_the_unet_calls() -> None:
    from linfusion.pipelines.chain import unet_calls

    # int(asked x strength) of the steps asked for: low strengths ask for more so that one step remains
    for steps, strength, expected in (
        (10, 0.4, 4),
        (10, 0.1, 1),
        (25, 0.32, 8),
        (3, 0.08, 1),
        (50, 0.25, 12),
    ):
        stage = Stage(64, 64, strength)
        assert denoising_steps(stage, steps) == expected
        assert unet_calls(stage, steps, "sdedit") == expected
        assert unet_calls(stage, steps, "demofusion") == 2 * expected  # the dilated global branch
    base = Stage(32, 32, None)
    assert denoising_steps(base, 10) == unet_calls(base, 10, "demofusion") == 10


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
