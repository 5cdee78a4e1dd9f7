"""Generation parameters: an immutable value, checked before any work, round-tripped through the PNG."""

from __future__ import annotations

import dataclasses

import pytest

from linfusion.app.params import GenerationError, GenerationParams


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
        ({"steps": 0}, "--steps must be >= 1"),
        ({"scheduler": "fastest"}, "unknown scheduler"),
        ({"mode": "tiles"}, "unknown mode"),
        ({"vae_attention": "fast"}, "unknown VAE attention"),
    ],
)
def test_validation_names_the_setting(changes: dict, message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        GenerationParams(prompt="a red circle").replace(**changes).validate()


def test_text_without_settings_is_refused() -> None:
    with pytest.raises(GenerationError, match="Steps"):
        GenerationParams.from_text("just a caption")
    with pytest.raises(GenerationError, match="cannot read the parameters"):
        GenerationParams.from_text("x\nSteps: many, Size: 64x64")
