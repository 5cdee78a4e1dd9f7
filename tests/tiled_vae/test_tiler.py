"""Execution: the tiled decode and encode equal the untiled VAE for any band size, store policy and store
device; diffusers' own tiling does not."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL

from linfusion.patches.vae_attention import apply_vae_attention
from linfusion.testing import tiny_vae
from linfusion.tiled_vae import tiled_decode, tiled_encode_moments
from support.tiled_vae import (
    FOUR_LEVEL,
    MIB,
    ONE_ROW,
    POLICIES,
    four_level_vae,
    images_for,
    perturbed,
    policy_options,
)


@pytest.fixture(params=["two-level", "four-level", "two-level-linear-attention"])
def vae(request) -> AutoencoderKL:
    """The linear mid-block attention runs through the tiler's two-pass state path instead of softmax."""
    model = four_level_vae() if request.param == "four-level" else perturbed(tiny_vae())
    if request.param.endswith("linear-attention"):
        apply_vae_attention(model, "linear")
    return model


# ---------------------------------------------------------------------------------------- exactness
# Without a GPU here, "cpu" is the VAE's own device too; the argument path is exercised all the same.
# Store blocks of one row free rows as soon as they are read; 32 MiB blocks hold these activations whole.
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    "band_bytes, block_bytes, store_device",
    [(ONE_ROW, ONE_ROW, None), (ONE_ROW, 32 * MIB, "cpu"), (50_000, ONE_ROW, None), (10**10, ONE_ROW, "cpu")],
)
def test_tiled_decode_equals_untiled(
    vae: AutoencoderKL, band_bytes: int, block_bytes: int, store_device, policy: str
) -> None:
    latents = torch.randn(2, 4, 13, 7)  # odd sizes, batch 2
    with torch.no_grad():
        expected = vae.decode(latents).sample
    options = policy_options(vae, latents.shape, False, policy, band_bytes, block_bytes)
    actual = tiled_decode(vae, latents, store_device=store_device, **options)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    "band_bytes, block_bytes, store_device",
    [(ONE_ROW, ONE_ROW, None), (ONE_ROW, 32 * MIB, "cpu"), (10**10, ONE_ROW, None)],
)
def test_tiled_encode_equals_untiled(
    vae: AutoencoderKL, band_bytes: int, block_bytes: int, store_device, policy: str
) -> None:
    images = images_for(vae)
    with torch.no_grad():
        expected = vae._encode(images)
    options = policy_options(vae, images.shape, True, policy, band_bytes, block_bytes)
    actual = tiled_encode_moments(vae, images, store_device=store_device, **options)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4


def test_vae_without_quant_convs_or_mid_block_attention() -> None:
    """The chain follows the config: no (post-)quant conv, no mid-block attention."""
    torch.manual_seed(2)
    config = {**FOUR_LEVEL, "use_quant_conv": False, "use_post_quant_conv": False}
    vae = perturbed(AutoencoderKL(**config, mid_block_add_attention=False).eval())
    latents, images = torch.randn(1, 4, 13, 7), images_for(vae, batch=1)
    options = policy_options(vae, latents.shape, False, "mixed", 50_000)
    with torch.no_grad():
        assert (tiled_decode(vae, latents, **options) - vae.decode(latents).sample).abs().max() <= 1e-4
        assert (
            tiled_encode_moments(vae, images, band_bytes=ONE_ROW) - vae._encode(images)
        ).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 3e-2), (torch.bfloat16, 2e-1)])
def test_half_precision_tiling_adds_no_error(dtype: torch.dtype, tolerance: float) -> None:
    """In fp16/bf16 the tiled VAE (statistics summed in fp32/fp64) is as close to the fp32 VAE as the
    plain VAE in that dtype is (outputs span about +-2.6 here)."""
    vae = four_level_vae()
    low = copy.deepcopy(vae).to(dtype)
    latents, images = torch.randn(1, 4, 13, 7), images_for(vae, batch=1)
    with torch.no_grad():
        reference, reference_moments = vae.decode(latents).sample, vae._encode(images)
        plain = low.decode(latents.to(dtype)).sample.float()
        plain_moments = low._encode(images.to(dtype)).float()
    budget = policy_options(low, latents.shape, False, "mixed", 50_000)
    tiled = tiled_decode(low, latents, **budget).float()
    tiled_moments = tiled_encode_moments(low, images, band_bytes=50_000).float()
    for ours, theirs, exact in ((tiled, plain, reference), (tiled_moments, plain_moments, reference_moments)):
        our_error = (ours - exact).abs().max().item()
        assert our_error <= tolerance
        assert our_error <= 1.5 * (theirs - exact).abs().max().item()


@pytest.mark.parametrize("encode", [False, True])
@pytest.mark.parametrize("band_bytes", [ONE_ROW, 50_000])
def test_statistics_keep_their_precision_at_a_large_mean(encode: bool, band_bytes: int) -> None:
    """A conv_in bias of 1e4 shifts every activation the residual path carries by about 1e4 while their
    spread stays about 1: sums and sums of squares per chunk (float32) lose the variance there (the tiled
    decode was then off by 0.03-0.07), while the chunks' centered moments merged in float64 keep it. The
    tiled result stays as close to a float64 VAE as the plain float32 one is."""
    vae = four_level_vae()
    part = vae.encoder if encode else vae.decoder
    with torch.no_grad():
        part.conv_in.bias += 1e4
    exact_vae = copy.deepcopy(vae).double()
    torch.manual_seed(0)
    tensor = images_for(vae, batch=1) if encode else torch.randn(1, 4, 13, 7)
    with torch.no_grad():
        if encode:
            exact, plain = exact_vae._encode(tensor.double()), vae._encode(tensor)
        else:
            exact, plain = exact_vae.decode(tensor.double()).sample, vae.decode(tensor).sample
    run = tiled_encode_moments if encode else tiled_decode
    tiled = run(vae, tensor, band_bytes=band_bytes)
    plain_error = (plain.double() - exact).abs().max().item()
    tiled_error = (tiled.double() - exact).abs().max().item()
    assert tiled_error <= max(3 * plain_error, 1e-5)


# ---------------------------------------------------------------------------------------- diffusers' tiling
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
    ours = tiled_decode(vae, latents, band_bytes=ONE_ROW, store_points="level-inputs")
    their_error = (theirs - expected).abs().max().item()
    our_error = (ours - expected).abs().max().item()
    assert our_error <= 1e-4 and their_error > 100 * our_error
