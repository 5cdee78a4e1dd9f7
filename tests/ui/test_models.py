"""The web page's models: a PixArt pipeline folder is offered, with its LinFusion, and planned on meta copies."""

from __future__ import annotations

from pathlib import Path

import pytest

from linfusion.app.params import GenerationParams
from linfusion.app.prepare import prompt_length_notes
from linfusion.ui.backend import Backend
from linfusion.ui.models import ModelShelf
from support.pixart import save_tiny_pixart


def linear_layers(model) -> int:
    return sum(type(m).__name__ == "GeneralizedLinearAttention" for m in model.modules())


def test_a_pixart_folder_is_offered_with_its_own_linfusion(tmp_path: Path) -> None:
    folder = str(save_tiny_pixart(tmp_path / "pixart"))
    backend = Backend(["bundled", folder], tmp_path / "outputs", device="cpu")
    backend.load_all()
    assert backend.model_names == ["bundled", folder]
    slot = backend.slot(folder)
    assert type(slot.pipe).__name__ == "PixArtSigmaPipeline"
    assert slot.linfusion is not None and slot.linfusion_error is None and slot.native == 32
    assert linear_layers(slot.pipe.transformer) == 0  # mounted per job, not while idle


def test_planning_copies_of_a_pixart_model_are_on_meta_with_linfusion_as_asked(tmp_path: Path) -> None:
    shelf = ModelShelf([str(save_tiny_pixart(tmp_path / "pixart"))], device="cpu")
    slot = shelf.slot(shelf.model_names[0])
    with_linfusion = shelf.planning_view(slot, True, "exact")
    assert with_linfusion.transformer.device.type == "meta" and not hasattr(with_linfusion, "unet")
    assert linear_layers(with_linfusion.transformer) == 2
    long_prompt = GenerationParams("x" * 400)  # T5 tokens: the byte-level tokenizer's, one per character
    (note,) = prompt_length_notes(with_linfusion, long_prompt)
    assert note == prompt_length_notes(slot.pipe, long_prompt)[0] and "the text encoder reads 300" in note
    assert linear_layers(shelf.planning_view(slot, False, "exact").transformer) == 0
    assert linear_layers(slot.pipe.transformer) == 0  # the loaded pipeline is untouched


def test_a_pixart_folder_without_linfusion_runs_without_it_and_says_why(tmp_path: Path) -> None:
    shelf = ModelShelf([str(save_tiny_pixart(tmp_path / "bare", linfusion=False))], device="cpu")
    slot = shelf.slot(shelf.model_names[0])
    assert slot.linfusion is None
    assert slot.linfusion_error is not None and "linfusion distill" in slot.linfusion_error


@pytest.mark.parametrize("linfusion", [True, False])
def test_a_unet_models_planning_copy_is_unchanged(linfusion: bool, tmp_path: Path) -> None:
    shelf = ModelShelf(["bundled"], device="cpu")
    view = shelf.planning_view(shelf.slot("bundled"), linfusion, "exact")
    assert view.unet.device.type == "meta" and not hasattr(view, "transformer")
    assert (linear_layers(view.unet) > 0) == linfusion


def test_a_pixart_job_reports_every_step_of_every_stage(tmp_path: Path) -> None:
    """A PixArt job through the page's backend: plain, then an SDEdit chain at 2x (the DiT planner plans it)."""
    from linfusion.ui.jobs import Job
    from linfusion.ui.requests import TextToImageRequest

    folder = str(save_tiny_pixart(tmp_path / "pixart"))
    backend = Backend([folder], tmp_path / "outputs", device="cpu")
    for mode, size, expected in (
        ("plain", 32, [(0, 1, 3), (0, 2, 3), (0, 3, 3)]),
        (
            "sdedit",
            64,
            [(0, 1, 3), (0, 2, 3), (0, 3, 3), (1, 1, 1)],
        ),  # 0.4 of stage_steps(3, 0.4) = 4: 1 step
    ):
        reported: list[tuple] = []
        job = Job(1, "test", "test", lambda job: None)
        original = job.step_done

        def step_done(stage, step, steps=None, original=original, reported=reported):
            reported.append((stage, step, steps))
            original(stage, step, steps)

        job.step_done = step_done
        request = TextToImageRequest(
            "a red circle", width=size, height=size, steps=3, seed=2, model=folder, mode=mode
        )
        result = backend.text_to_image(request, job)
        assert reported == expected
        assert f"Size: {size}x{size}" in result.parameters and f"Model: {folder}" in result.parameters
