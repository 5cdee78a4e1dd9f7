"""The mid-block attention pass's kernels."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from linfusion.ops.reference import linear_attention_reference
from linfusion.patches.vae_attention import apply_vae_attention
from linfusion.testing import tiny_vae
from linfusion.tiled_vae import tiled_decode
from linfusion.tiled_vae.attention import linear_reader, softmax_in_key_chunks
from support.tiled_vae import ONE_ROW, perturbed


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


def test_softmax_in_key_chunks_equals_softmax_over_all_keys() -> None:
    query, key, value = torch.randn(2, 1, 9, 8), torch.randn(2, 1, 23, 8), torch.randn(2, 1, 23, 8)
    chunks = [(key[:, :, a:b], value[:, :, a:b]) for a, b in ((0, 1), (1, 11), (11, 23))]
    actual = softmax_in_key_chunks(query, chunks, scale=0.3)
    expected = F.scaled_dot_product_attention(query, key, value, scale=0.3)
    assert (actual - expected).abs().max().item() <= 1e-5


def test_linear_reader_over_bands_equals_linear_attention_over_all_tokens() -> None:
    """The bands' key/value states sum to the whole sequence's (checked against the reference op)."""
    attention = SimpleNamespace(processor=SimpleNamespace(eps=1e-4))
    query, key, value = torch.randn(2, 1, 9, 8), torch.randn(2, 1, 23, 8), torch.randn(2, 1, 23, 8)
    bands = [(key[:, :, a:b], value[:, :, a:b]) for a, b in ((0, 5), (5, 6), (6, 23))]
    read = linear_reader(attention, bands, 23, torch.device("cpu"))
    expected = linear_attention_reference(query, key, value, 1e-4)
    assert (read(query).float() - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("band_bytes, kernel", [(10**10, "softmax"), (ONE_ROW, "key chunks")])
def test_softmax_kernel_follows_the_chunk_budget(
    monkeypatch: pytest.MonkeyPatch, band_bytes: int, kernel: str
) -> None:
    """Keys and values that fit half the budget stay on the device (one fused softmax per query chunk);
    otherwise the keys are read chunk by chunk and the fused softmax never runs."""
    vae = perturbed(tiny_vae())
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    latents = torch.randn(1, 4, 9, 9)
    with torch.no_grad():
        expected = vae.decode(latents).sample
    calls.clear()
    actual = tiled_decode(vae, latents, band_bytes=band_bytes)
    assert (actual - expected).abs().max().item() <= 1e-4
    assert (len(calls) > 0) == (kernel == "softmax")
