"""SDEdit chains on tiny pipelines: stage plans, sizes, image input, callbacks, saved stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from linfusion import LinFusion
from linfusion.pipelines import Stage, plan_stages, sdedit, upscale
from linfusion.testing import tiny_pipeline


def test_default_plan_doubles_with_reference_strengths_and_a_partial_last_stage() -> None:
    plan = plan_stages(8192, 4096, base_long_side=1024)
    assert plan[0] == Stage(1024, 512, None)
    assert [(s.width, s.height) for s in plan[1:]] == [(2048, 1024), (4096, 2048), (8192, 4096)]
    assert [s.strength for s in plan[1:]] == pytest.approx([0.4, 0.25, 0.1])
    four = plan_stages(16384, 8192, base_long_side=1024)
    assert [s.strength for s in four[1:]] == pytest.approx([0.4, 0.3, 0.2, 0.1])  # the reference's chain
    xl = plan_stages(16384, 16384, base_long_side=1024, sdxl=True)
    assert [s.strength for s in xl[1:]] == pytest.approx([0.32, 0.24, 0.16, 0.08])
    partial = plan_stages(3000, 2000, base_long_side=512)
    assert [(s.width, s.height) for s in partial] == [(512, 344), (1024, 688), (2048, 1376), (3000, 2000)]


def test_plan_from_an_input_image_and_bad_requests() -> None:
    plan = plan_stages(200, 120, base_long_side=512, start=(50, 30))
    assert all(s.strength is not None for s in plan)  # no base generation for an input image
    assert [(s.width, s.height) for s in plan] == [(96, 64), (200, 120)]
    with pytest.raises(ValueError, match="multiples of 8"):
        plan_stages(1000, 1001, base_long_side=512)
    with pytest.raises(ValueError, match="need 2 strengths"):
        plan_stages(2048, 2048, base_long_side=512, strengths=[0.3])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_four_stage_chain_to_sixteen_times_the_area(family: str, tmp_path: Path) -> None:
    pipe = tiny_pipeline(family)
    LinFusion.construct_for(pipe, load_pretrained=False, init="teacher")
    steps_seen: list[int] = []
    ended: list[tuple] = []

    def count(pipeline, step, timestep, tensors):
        steps_seen.append(step)
        return tensors

    image = sdedit(
        pipe, "a red circle", 128, 128, num_inference_steps=4, stages=4, generator=torch.Generator().manual_seed(0),
        save_stages=tmp_path, callback_on_step_end=count, exact_vae_tiling_from=64 * 64,
        on_stage_end=lambda index, stage, picture: ended.append((index, (stage.width, stage.height), picture.size)),
    )  # fmt: skip
    assert image.size == (128, 128)
    assert [size for _, size, _ in ended] == [(32, 32), (48, 48), (64, 64), (88, 88), (128, 128)]
    assert all(stage == picture for _, stage, picture in ended) and [i for i, _, _ in ended] == [
        0,
        1,
        2,
        3,
        4,
    ]
    pixels = np.asarray(image).astype(float)
    assert np.isfinite(pixels).all() and pixels.std() > 1.0  # not constant
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == [
        "stage-1-32x32.png",
        "stage-2-48x48.png",
        "stage-3-64x64.png",
        "stage-4-88x88.png",
        "stage-5-128x128.png",
    ]
    assert all(Image.open(tmp_path / name).size == tuple(map(int, name[8:-4].split("x"))) for name in saved)
    assert len(steps_seen) > 4  # the callback reached every stage, not only the base


def test_upscale_an_existing_image() -> None:
    pipe = tiny_pipeline("sd15")
    source = Image.fromarray(np.random.RandomState(0).randint(0, 255, (24, 40, 3), dtype=np.uint8))
    result = upscale(pipe, source, 4, prompt="", num_inference_steps=2)
    assert result.size == (160, 96)
    with pytest.raises(ValueError, match="must be > 1"):
        upscale(pipe, source, 1.0)
