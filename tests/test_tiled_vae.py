"""Exact tiled VAE: equals the untiled VAE for any band size; diffusers' own tiling does not."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from linfusion.patches.vae_attention import apply_vae_attention
from linfusion.testing import tiny_vae
from linfusion.tiled_vae import UnsupportedVAE, tiled_decode, tiled_encode_moments

ONE_ROW = 1  # a band budget so small that every layer runs one row at a time


def perturbed(vae: AutoencoderKL) -> AutoencoderKL:
    """Random weights away from their initial values (GroupNorm affine included)."""
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return vae


def four_level_vae() -> AutoencoderKL:
    """SD-VAE-shaped: 4 levels (factor 8), channel changes (1x1 shortcuts), mid-block attention."""
    torch.manual_seed(1)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=2,
    )
    return perturbed(vae.eval())


@pytest.fixture(params=["two-level", "four-level", "two-level-linear-attention"])
def vae(request) -> AutoencoderKL:
    """The linear mid-block attention runs through the tiler's two-pass state path instead of softmax."""
    model = four_level_vae() if request.param == "four-level" else perturbed(tiny_vae())
    if request.param.endswith("linear-attention"):
        apply_vae_attention(model, "linear")
    return model


@pytest.mark.parametrize("band_bytes", [ONE_ROW, 50_000, 10**10])
def test_tiled_decode_equals_untiled(vae: AutoencoderKL, band_bytes: int) -> None:
    latents = torch.randn(2, 4, 13, 7)  # odd sizes, batch 2
    with torch.no_grad():
        expected = vae.decode(latents).sample
    actual = tiled_decode(vae, latents, band_bytes=band_bytes)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("band_bytes", [ONE_ROW, 10**10])
def test_tiled_encode_equals_untiled(vae: AutoencoderKL, band_bytes: int) -> None:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    images = torch.rand(2, 3, 13 * factor, 7 * factor) * 2 - 1
    with torch.no_grad():
        expected = vae._encode(images)
    actual = tiled_encode_moments(vae, images, band_bytes=band_bytes)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4


def test_diffusers_tiling_is_not_exact_where_ours_is() -> None:
    """diffusers normalizes each tile on its own: measurable differences (seams), unlike ours."""
    vae = four_level_vae()
    latents = torch.randn(1, 4, 24, 24)
    with torch.no_grad():
        expected = vae.decode(latents).sample
        vae.enable_tiling()
        vae.tile_latent_min_size, vae.tile_sample_min_size = 8, 64
        theirs = vae.decode(latents).sample
        vae.disable_tiling()
    ours = tiled_decode(vae, latents, band_bytes=ONE_ROW)
    their_error = (theirs - expected).abs().max().item()
    our_error = (ours - expected).abs().max().item()
    assert our_error <= 1e-4 and their_error > 100 * our_error


def test_unknown_layers_are_refused_not_approximated() -> None:
    vae = tiny_vae()
    vae.decoder.conv_act = torch.nn.ReLU()
    with pytest.raises(UnsupportedVAE, match="decoder activation"):
        tiled_decode(vae, torch.randn(1, 4, 4, 4))


def test_linear_attention_tiling_never_calls_softmax(monkeypatch: pytest.MonkeyPatch) -> None:
    """The linear path is the two-pass state path, not the quadratic one under another name."""
    vae = perturbed(tiny_vae())
    apply_vae_attention(vae, "linear")
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    tiled_decode(vae, torch.randn(1, 4, 9, 9), band_bytes=ONE_ROW)
    assert calls == []
