"""The chain runner's own behaviour on a tiny pipeline: the progress-bar settings reach every stage."""

from __future__ import annotations

import pytest

from linfusion.pipelines import sdedit
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
