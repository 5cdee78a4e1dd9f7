"""The linear VAE mid-block attention: its formula, reversible mounting, and its fidelity on the bundled VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linfusion.ops.reference import linear_attention_quadratic
from linfusion.testing import tiny_vae
from linfusion.vae_attention import (
    LinearVAEAttnProcessor,
    linear_vae_attention,
    linearize_vae_attention,
    measure_vae_attention,
    mid_block_tokens,
    restore_vae_attention,
    set_vae_attention,
    vae_attention_mode,
    vae_attentions,
)


def perturbed_vae():
    vae = tiny_vae()
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return vae


def test_processor_matches_the_explicit_formula() -> None:
    """GroupNorm, biased q/k/v, phi = elu + 1 normalized attention as an N x N matrix, to_out, residual."""
    layer = vae_attentions(perturbed_vae())[1]
    layer.set_processor(LinearVAEAttnProcessor())
    hidden = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    layer.double()
    with torch.no_grad():
        actual = layer(hidden)
        tokens = layer.group_norm(hidden).flatten(2).transpose(1, 2)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (layer.to_q, layer.to_k, layer.to_v))  # one head
        attended = linear_attention_quadratic(q, k, v, eps=1e-4).squeeze(1)
        expected = layer.to_out[0](attended).transpose(1, 2).reshape(hidden.shape) + hidden
    assert layer.heads == 1
    assert torch.allclose(actual, expected, atol=1e-10)


def test_linearize_and_restore_are_inverse() -> None:
    vae = perturbed_vae()
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        exact = vae.decode(latents).sample
        assert linearize_vae_attention(vae) == 2 and linearize_vae_attention(vae) == 0  # idempotent
        assert vae_attention_mode(vae) == "linear"
        linear = vae.decode(latents).sample
        restore_vae_attention(vae)
        assert vae_attention_mode(vae) == "exact"
        again = vae.decode(latents).sample
    assert (linear - exact).abs().max().item() > 1e-4  # a different kernel, visibly
    assert torch.equal(again, exact)


def test_context_manager_restores_and_respects_an_outer_linearization() -> None:
    vae = perturbed_vae()
    with linear_vae_attention(vae):
        assert vae_attention_mode(vae) == "linear"
    assert vae_attention_mode(vae) == "exact"
    set_vae_attention(vae, "linear")
    with linear_vae_attention(vae):
        pass
    assert vae_attention_mode(vae) == "linear"  # the outer call still owns it
    set_vae_attention(vae, "exact")
    assert vae_attention_mode(vae) == "exact"


def test_bad_input_is_refused() -> None:
    from linfusion.testing import tiny_unet

    unet_attention = tiny_unet().down_blocks[0].attentions[0].transformer_blocks[0].attn1
    with pytest.raises(ValueError, match="not a VAE mid-block self-attention"):
        unet_attention.set_processor(LinearVAEAttnProcessor())
        unet_attention(torch.randn(1, 16, unet_attention.query_dim))
    with pytest.raises(ValueError, match="must be one of"):
        set_vae_attention(tiny_vae(), "fast")


def test_mid_block_tokens() -> None:
    assert mid_block_tokens(tiny_vae(), 4096, 2048) == 2048 * 1024  # two levels: factor 2


def test_bundled_vae_linear_attention_is_close_to_softmax() -> None:
    """On the bundled VAE the linear layer stays far closer to the exact VAE than dropping the layer,
    and closer than the VAE's own reconstruction error (measured 46-48 dB vs 24-26 dB dropped, 33-38 dB)."""
    from linfusion.bundled.components import load_pipeline
    from linfusion.data import shapes

    vae = load_pipeline().vae
    images = shapes.to_tensor(
        np.stack([shapes.render_seed(shapes.split_seed(i, "heldout"), size=64)[0] for i in range(4)])
    )
    records = measure_vae_attention(vae, images, sizes=(32, 64, 128))
    assert vae_attention_mode(vae) == "exact"  # measuring leaves the VAE as it was
    for record in records:
        assert record["linear_vs_exact_psnr"] >= 43.0, record
        assert record["dropped_vs_exact_psnr"] <= 30.0, record
        assert record["linear_vs_exact_psnr"] > record["reconstruction_psnr"] + 6.0, record


def test_quadratic_attention_hint() -> None:
    from linfusion.vae_attention import QUADRATIC_HINT_TOKENS, quadratic_attention_hint

    vae = tiny_vae()
    side = int((QUADRATIC_HINT_TOKENS) ** 0.5) * 2  # factor 2: this many mid-block tokens exactly
    assert quadratic_attention_hint(vae, [(64, 64)]) is None
    message = quadratic_attention_hint(vae, [(64, 64), (side, side)])
    assert (
        message is not None
        and f"{QUADRATIC_HINT_TOKENS:,} tokens" in message
        and "--vae-attention linear" in message
    )
    with linear_vae_attention(vae):
        assert quadratic_attention_hint(vae, [(side, side)]) is None


def test_memory_planner_traces_the_kernel_the_vae_runs() -> None:
    from linfusion.planner import MemoryPlanner, Savers
    from linfusion.testing import tiny_pipeline

    pipe = tiny_pipeline("sd15")
    planner = MemoryPlanner(pipe)
    exact = planner.vae_activations(256, 256, Savers(tiled_vae=True))
    assert vae_attention_mode(planner.meta_vae()) == "exact"
    linearize_vae_attention(pipe.vae)
    assert vae_attention_mode(planner.meta_vae()) == "linear"
    linear = planner.vae_activations(256, 256, Savers(tiled_vae=True))  # traced again, not the cached figure
    assert ("vae", 256, 256, True, False, "linear") in planner._traced and linear > 0 and exact > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layer_against_fp32(dtype: torch.dtype) -> None:
    """Half-precision weights and activations, statistics in fp32 (the op's rule): within 2 % of the fp32
    layer's output range (bf16 keeps 8 mantissa bits, fp16 11), and finite."""
    layer = vae_attentions(perturbed_vae())[1]
    layer.set_processor(LinearVAEAttnProcessor())
    hidden = torch.randn(1, 32, 24, 24)
    with torch.no_grad():
        expected = layer(hidden)
        actual = layer.to(dtype)(hidden.to(dtype)).float()
    assert torch.isfinite(actual).all()
    assert (actual - expected).abs().max().item() <= 0.02 * expected.abs().max().item()
