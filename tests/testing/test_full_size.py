"""The random full-size pipelines have the published architectures (parameter counts)."""

from __future__ import annotations

import pytest
import torch

from linfusion.testing.full_size import random_full_size_pipeline


@pytest.mark.parametrize(("family", "unet_parameters"), [("sd15", 859_520_964), ("sdxl", 2_567_463_684)])
def test_random_full_size_models_have_the_published_sizes(family: str, unet_parameters: int) -> None:
    pipe = random_full_size_pipeline(family, torch.float16, "meta")
    assert sum(p.numel() for p in pipe.unet.parameters()) == unet_parameters
    assert sum(p.numel() for p in pipe.vae.parameters()) == 83_653_863
    assert pipe.unet.dtype == torch.float16 and (family == "sdxl") == hasattr(pipe, "text_encoder_2")
