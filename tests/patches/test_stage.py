"""A stage's savers as patches: model CPU offload through ``apply_savers`` is exact and leaves no hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linfusion.patches.stage import Savers, apply_savers, apply_text_encoder_on_cpu
from linfusion.pipelines import dit
from linfusion.testing import tiny_pipeline


def test_model_offload_stage_is_exact_and_leaves_no_hooks() -> None:
    pipe = tiny_pipeline("sd15")

    def image() -> np.ndarray:
        return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]  # fmt: skip

    plain = image()
    with apply_savers(pipe, Savers(model_offload=True)):
        assert pipe.unet._hf_hook is not None  # diffusers' model CPU offload is on
        offloaded = image()
    np.testing.assert_array_equal(offloaded, plain)
    assert getattr(pipe.unet, "_hf_hook", None) is None
    with (
        pytest.raises(RuntimeError, match="stop"),
        apply_savers(pipe, Savers(model_offload=True)),
    ):
        raise RuntimeError("stop")
    assert getattr(pipe.unet, "_hf_hook", None) is None and getattr(pipe.vae, "_hf_hook", None) is None


def pixart_image(pipe: object) -> np.ndarray:
    image = dit.text_to_image(pipe, "a red circle", 32, 32, negative_prompt="blue", num_inference_steps=2,
                              guidance_scale=3.0, generator=torch.Generator().manual_seed(0))  # fmt: skip
    return np.asarray(image)


def model_state(pipe: object) -> dict[str, tuple]:
    """Every model's instance attributes, parameters and buffers (values and devices)."""
    models = {name: model for name, model in pipe.components.items() if isinstance(model, torch.nn.Module)}  # type: ignore[attr-defined]
    return {name: (sorted(model.__dict__), {key: (value.device, value.clone()) for key, value in model.state_dict().items()})
            for name, model in models.items()}  # fmt: skip


def assert_same_state(before: dict[str, tuple], after: dict[str, tuple]) -> None:
    assert before.keys() == after.keys()
    for name, (attributes, tensors) in before.items():
        assert after[name][0] == attributes, name
        assert after[name][1].keys() == tensors.keys()
        for key, (device, value) in tensors.items():
            assert after[name][1][key][0] == device and torch.equal(after[name][1][key][1], value), (
                name,
                key,
            )


def test_prompt_encoded_on_the_cpu_is_exact_and_removal_restores_the_offload_hooks() -> None:
    """Under model offload the text encoder leaves accelerate's hooks for the CPU and the image is the same;
    removing it puts the very hook back, and removing both leaves the pipeline as it was."""
    pipe = tiny_pipeline("pixart-sigma")
    plain = pixart_image(pipe)
    before = model_state(pipe)
    encoder = pipe.text_encoder
    with apply_savers(pipe, Savers(model_offload=True)):
        hook = encoder._hf_hook
        offloaded = model_state(pipe)
        with apply_text_encoder_on_cpu(pipe):
            assert getattr(encoder, "_hf_hook", None) is None and encoder.device == torch.device("cpu")
            assert pipe._exclude_from_cpu_offload == ["text_encoder"]
            assert pipe.transformer._hf_hook is not None  # the rest stays offloaded
            on_cpu = pixart_image(pipe)
        assert encoder._hf_hook is hook and "_exclude_from_cpu_offload" not in pipe.__dict__
        assert_same_state(offloaded, model_state(pipe))
        assert np.array_equal(pixart_image(pipe), plain)  # the hook put back still offloads and runs
    np.testing.assert_array_equal(on_cpu, plain)
    assert_same_state(before, model_state(pipe))
    savers = Savers(model_offload=True, text_encoder_on_cpu=True)
    assert savers.names() == ["model CPU offload", "prompt encoded on the CPU"]
    with apply_savers(pipe, savers):
        assert getattr(encoder, "_hf_hook", None) is None
        np.testing.assert_array_equal(pixart_image(pipe), plain)
    assert_same_state(before, model_state(pipe))


def test_prompt_encoded_on_the_cpu_needs_model_offload() -> None:
    pipe = tiny_pipeline("pixart-sigma")
    before = model_state(pipe)
    with pytest.raises(ValueError, match="turn offload on first"):
        apply_savers(pipe, Savers(text_encoder_on_cpu=True))
    assert_same_state(before, model_state(pipe))
