"""The chain runner on a tiny pipeline (progress-bar settings reach every stage) and its step counts."""

from __future__ import annotations

import pytest

from linfusion.pipelines import sdedit
from linfusion.pipelines.chain import Stage, denoising_steps
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
    from linfusion.app.plan import unet_calls

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
