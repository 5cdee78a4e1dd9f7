"""Generation parameters: an immutable value, checked before any work, round-tripped through the PNG."""

from __future__ import annotations

import dataclasses
import math

import pytest

from linfusion.app.params import RANDOM_SEED, GenerationError, GenerationParams, read_png_parameters
from linfusion.errors import UserError


def test_parameters_text_round_trip() -> None:
    params = GenerationParams(prompt="a cat,\non two lines", negative_prompt="dog", width=64, height=48, steps=7,
                              guidance=3.5, seed=11, scheduler="dpm++", model="some/model", linfusion="none", dtype="fp32")  # fmt: skip
    assert GenerationParams.from_text(params.to_text()) == params


def test_parameters_are_immutable_and_replace_returns_a_new_value() -> None:
    params = GenerationParams(prompt="a red circle")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.width = 64  # type: ignore[misc]
    wider = params.replace(width=64, height=32)
    assert (wider.width, wider.height) == (64, 32) and params.width is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": "  "}, "the prompt is empty"),
        ({"width": 33}, "not a positive multiple of 8"),
        ({"steps": 0}, "--steps must be a whole number >= 1"),
        ({"steps": 2.5}, "--steps must be a whole number >= 1"),
        ({"guidance": math.nan}, "--guidance must be a finite number >= 0"),
        ({"guidance": math.inf}, "--guidance must be a finite number >= 0"),
        ({"guidance": -1.0}, "--guidance must be a finite number >= 0"),
        ({"seed": -2}, "--seed must be a whole number from 0 to 2\\*\\*64-1, or -1"),
        ({"seed": 2**64}, "--seed must be a whole number from 0 to 2\\*\\*64-1, or -1"),
        ({"width": 0}, "width 0 is not a positive multiple of 8"),
        ({"height": -64}, "height -64 is not a positive multiple of 8"),
        ({"scheduler": "fastest"}, "unknown scheduler"),
        ({"mode": "tiles"}, "unknown mode"),
        ({"vae_attention": "fast"}, "unknown VAE attention"),
    ],
)
def test_validation_names_the_setting(changes: dict, message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        GenerationParams(prompt="a red circle").replace(**changes).validate()


def test_generation_errors_are_user_errors() -> None:
    """The command line prints a UserError without a traceback (exit 2); GenerationError is one."""
    assert issubclass(GenerationError, UserError) and issubclass(GenerationError, ValueError)


def test_guidance_zero_and_one_mean_no_guidance_and_are_accepted() -> None:
    for guidance in (0.0, 1.0, 7.5):
        GenerationParams(prompt="a red circle", guidance=guidance).validate()


def test_the_model_minimum_side_is_checked_when_known() -> None:
    params = GenerationParams(prompt="a red circle", width=64, height=16)
    params.validate()  # the model is not known yet
    with pytest.raises(GenerationError, match="height 16 is too small for this model.*at least 64 pixels"):
        params.validate(minimum_side=64)


def test_a_random_seed_is_drawn_once_and_then_kept() -> None:
    params = GenerationParams(prompt="a red circle", seed=RANDOM_SEED)
    params.validate()
    drawn = {params.with_seed().seed for _ in range(5)}
    assert RANDOM_SEED not in drawn and len(drawn) > 1 and all(0 <= seed < 2**32 for seed in drawn)
    fixed = GenerationParams(prompt="a red circle", seed=42)
    assert fixed.with_seed() is fixed


def test_unreadable_png_files_are_refused_with_a_message(tmp_path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not an image")
    with pytest.raises(GenerationError, match="cannot read .*notes.txt as an image"):
        read_png_parameters(notes)
    with pytest.raises(GenerationError, match="missing.png: no such file"):
        read_png_parameters(tmp_path / "missing.png")


def test_text_without_settings_is_refused() -> None:
    with pytest.raises(GenerationError, match="Steps"):
        GenerationParams.from_text("just a caption")
    with pytest.raises(GenerationError, match="cannot read the parameters"):
        GenerationParams.from_text("x\nSteps: many, Size: 64x64")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 1001}, "at most 500"),
        ({"prompt": 123}, "prompt must be text .*got int 123"),
        ({"prompt": ["a cat", "a dog"]}, "prompt must be text .*got list"),
        ({"negative_prompt": None}, "negative_prompt must be text"),
        ({"linfusion": None}, 'linfusion must be text \\("none": without LinFusion\\); got None'),
        ({"model": 5}, "model must be text"),
        ({"width": 32.0}, "width 32.0 is not a whole number and a multiple of 8 .*try 32$"),
        ({"height": 100.5}, "try 104$"),
        ({"scheduler": "x" * 100_000}, "unknown scheduler 'x+'... \\(99,880 more characters\\); choose"),
    ],
)
def test_python_api_values_of_the_wrong_kind_are_user_errors(changes: dict, message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        GenerationParams("a cat").replace(**changes).validate()


def test_a_huge_parameters_text_is_quoted_short_in_its_error() -> None:
    settings = "Steps: x, Size: " + "9" * 1_000_000
    with pytest.raises(GenerationError) as raised:
        GenerationParams.from_text("a cat\n" + settings)
    assert len(str(raised.value)) < 600
    assert "more characters)" in str(raised.value)


def test_an_unknown_recorded_sampler_is_noted() -> None:
    from linfusion.app.params import ignored_settings

    text = GenerationParams("a cat", scheduler="euler").to_text()
    assert ignored_settings(text) == []
    assert ignored_settings(text.replace("Sampler: euler", "Sampler: None")) == []
    (note,) = ignored_settings(text.replace("Sampler: euler", "Sampler: garbage"))
    assert "sampler 'garbage' is not one of ddim" in note and "model's own scheduler runs instead" in note


def test_excerpt_keeps_short_text_and_cuts_long_text() -> None:
    from linfusion.errors import excerpt

    assert excerpt("short") == "'short'"
    assert excerpt("x" * 200, limit=10) == "'xxxxxxxxxx'... (190 more characters)"
