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


@pytest.mark.parametrize(
    ("family", "transformer_parameters", "pipeline"),
    [
        ("pixart-alpha", 611_349_152, "PixArtAlphaPipeline"),
        ("pixart-sigma", 610_856_096, "PixArtSigmaPipeline"),
    ],
)
def test_random_pixart_pipelines_have_the_published_sizes(
    family: str, transformer_parameters: int, pipeline: str
) -> None:
    """PixArt-XL-2 (0.6 B), T5-v1.1-XXL's encoder (4.76 B) and the SD VAE, on meta."""
    pipe = random_full_size_pipeline(family, torch.float16, "meta")
    assert type(pipe).__name__ == pipeline
    assert sum(p.numel() for p in pipe.transformer.parameters()) == transformer_parameters
    assert sum(p.numel() for p in pipe.text_encoder.parameters()) == 4_762_310_656
    assert sum(p.numel() for p in pipe.vae.parameters()) == 83_653_863
    assert pipe.transformer.dtype == torch.float16 and pipe.text_encoder.device.type == "meta"
    assert pipe.tokenizer.model_max_length == (120 if family == "pixart-alpha" else 300)
