"""A stage's savers as patches: model CPU offload through ``apply_savers`` is exact and leaves no hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linfusion.patches.stage import Savers, apply_savers
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
