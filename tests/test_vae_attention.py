"""The linear VAE mid-block attention processor: its formula, its checks, half precision, the hint."""

from __future__ import annotations

import pytest
import torch

from linfusion.ops.reference import linear_attention_quadratic
from linfusion.patches.vae_attention import apply_vae_attention
from linfusion.testing import tiny_vae
from linfusion.vae_attention import LinearVAEAttnProcessor, mid_block_tokens, vae_attentions
from support import perturbed_vae


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


def test_bad_input_is_refused() -> None:
    from linfusion.testing import tiny_unet

    unet_attention = tiny_unet().down_blocks[0].attentions[0].transformer_blocks[0].attn1
    with pytest.raises(ValueError, match="not a VAE mid-block self-attention"):
        unet_attention.set_processor(LinearVAEAttnProcessor())
        unet_attention(torch.randn(1, 16, unet_attention.query_dim))


def test_mid_block_tokens() -> None:
    assert mid_block_tokens(tiny_vae(), 4096, 2048) == 2048 * 1024  # two levels: factor 2


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
    with apply_vae_attention(vae, "linear"):
        assert quadratic_attention_hint(vae, [(side, side)]) is None


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
