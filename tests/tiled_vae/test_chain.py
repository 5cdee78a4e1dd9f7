"""The chain model: shapes and GroupNorm inputs against the model itself; the attention pass's kernel."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from linfusion.bench.vae import SD_VAE
from linfusion.tiled_vae import Chain, Shape, vae_units
from linfusion.tiled_vae.chain import LINEAR, SOFTMAX, SOFTMAX_KEY_CHUNKS, attention_chunks

FP32 = 4


@pytest.mark.parametrize("encode", [False, True])
def test_sd_vae_chain_has_one_target_per_group_norm_and_the_vae_output_shape(encode: bool) -> None:
    """Every GroupNorm of the encoder (decoder) reads one target point; the last point is what the VAE
    returns (moments at 1/8 the size, or the image at 8x)."""
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE)
    part = vae.encoder if encode else vae.decoder
    group_norms = sum(isinstance(module, torch.nn.GroupNorm) for module in part.modules())
    height, width = (96, 64) if encode else (12, 8)
    chain = Chain(vae_units(SD_VAE, encode), 2, height, width, FP32)
    assert len(chain.targets()) == group_norms + 1  # and the output
    assert chain.targets()[-1] == chain.output
    expected = Shape(8, 12, 8) if encode else Shape(3, 96, 64)
    assert chain.shape(chain.output) == expected
    assert chain.tensor_bytes(chain.output) == 2 * FP32 * expected.channels * expected.height * expected.width


def test_attention_kernel_follows_the_mode_and_the_chunk_budget() -> None:
    """Linear attention: the state kernel, no keys or values kept. Softmax: keys and values on the device
    while they take at most half the budget, else in the store for the pass."""
    units = vae_units(SD_VAE, False)
    index = next(i for i, unit in enumerate(units) if unit.kind == "attention")
    exact, linear = (Chain(units, 1, 32, 32, FP32, attention) for attention in ("exact", "linear"))
    kv_bytes = 2 * 32 * 32 * 512 * FP32
    assert attention_chunks(linear, index, 10**10).kernel == LINEAR
    assert attention_chunks(linear, index, 10**10).stored_kv_bytes == 0
    on_device = attention_chunks(exact, index, 2 * kv_bytes)
    assert (on_device.kernel, on_device.kv_bytes, on_device.stored_kv_bytes) == (SOFTMAX, kv_bytes, 0)
    assert on_device.working_bytes >= kv_bytes
    stored = attention_chunks(exact, index, 2 * kv_bytes - 1)
    assert (stored.kernel, stored.stored_kv_bytes) == (SOFTMAX_KEY_CHUNKS, kv_bytes)
    assert stored.rows < 32  # the keys are read in chunks of rows
