"""The committed bundled model with its distilled LinFusion weights: offline loading, images, adherence,
the default `linfusion generate`, and a 4-stage chain to 16x the base area (issues 5 and 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bundled import evaluate
from linfusion import LinFusion
from linfusion.bundled import MODEL_DIR, load_pipeline
from linfusion.bundled import classifier as classifier_lib
from linfusion.cli import main
from linfusion.pipelines import sdedit

FIXED_SCENES = 16
# The student's classifier scores on the 16 fixed one-object prompts must reach these (the teacher's
# gates are 0.80 / 0.70 / 0.70 on 48-96 captions; see docs/quality.md for the 200-caption figures).
STUDENT_THRESHOLDS = {"background": 0.90, "found_colour": 0.85, "found_shape": 0.75}


@pytest.fixture(scope="module")
def student():
    pipe = load_pipeline(MODEL_DIR)
    linfusion = LinFusion.from_pretrained(MODEL_DIR / "linfusion").to(torch.float32)
    linfusion.mount(pipe.unet)
    return pipe


def test_committed_weights_are_fp16_and_within_the_size_budget() -> None:
    from safetensors import safe_open

    files = list(MODEL_DIR.rglob("*.safetensors"))
    assert {f.parent.name for f in files} >= {"unet", "vae", "text_encoder", "linfusion"}
    for path in files:
        with safe_open(str(path), "pt") as tensors:
            assert all(tensors.get_tensor(key).dtype == torch.float16 for key in tensors.keys()), path  # noqa: SIM118
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20


def test_student_loads_offline_and_draws_non_degenerate_images(student) -> None:
    assert sum(1 for _ in LinFusion.from_pretrained(MODEL_DIR / "linfusion").modules()) > 1
    images = evaluate.generate(
        student, ["a large blue square in the center , on a white background"] * 2, seed=0
    )
    assert images.shape == (2, 32, 32, 3)
    pixels = images.astype(float)
    assert np.isfinite(pixels).all() and pixels.std() > 10.0
    assert not np.array_equal(images[0], images[1])  # two seeds, two images


@pytest.mark.slow
def test_classifier_scores_the_student_on_sixteen_fixed_prompts(student) -> None:
    scenes = evaluate.heldout_scenes(FIXED_SCENES, n_objects=1, start=30_000)
    images = evaluate.generate(student, [scene.caption() for scene in scenes], seed=0)
    scores = classifier_lib.score(images, scenes)
    for key, threshold in STUDENT_THRESHOLDS.items():
        assert scores[key] >= threshold, (key, scores)


def test_default_generate_uses_the_bundled_student_and_reproduces_from_the_png(tmp_path: Path) -> None:
    out = tmp_path / "demo.png"
    prompt = "a small green triangle on the right , on a black background"
    assert main(["generate", prompt, "--out", str(out), "--steps", "10", "--quiet"]) == 0
    image = Image.open(out)
    assert image.size == (32, 32)
    text = image.info["parameters"]
    assert text.startswith(prompt) and "LinFusion: auto" in text and text.endswith("Model: bundled")
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(again)))


def test_four_stage_chain_to_sixteen_times_the_area(student, tmp_path: Path) -> None:
    image = sdedit(
        student, "a large red circle on the left , on a white background", 128, 128, stages=4,
        num_inference_steps=10, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
        save_stages=tmp_path,
    )  # fmt: skip
    assert image.size == (128, 128)
    pixels = np.asarray(image).astype(float)
    assert np.isfinite(pixels).all() and pixels.std() > 10.0
    sizes = [Image.open(p).size for p in sorted(tmp_path.iterdir(), key=lambda p: int(p.name.split("-")[1]))]
    assert sizes[0] == (32, 32) and sizes[-1] == (128, 128) and len(sizes) == 5
    assert (sizes[-1][0] * sizes[-1][1]) / (sizes[0][0] * sizes[0][1]) == 16
