"""The op and the replacement module against SPEC section 2, written out independently here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linfusion import GeneralizedLinearAttention, linear_attention
from linfusion.ops import linear_attention_quadratic, linear_attention_reference

HEAD_DIMS = [40, 64, 80, 160]
# Half-precision tolerances, relative to the largest fp32 output: measured errors are ~3e-4 (fp16) and
# ~3e-3 (bf16) at these sizes; the bounds leave an order of magnitude of headroom.
HALF_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def spec_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """SPEC 2, second form: out_i = sum_j w_ij v_j / (sum_j w_ij + eps N), w_ij = phi(q_i).phi(k_j), fp64."""
    q, k, v = q.double(), k.double(), v.double()
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    weights = torch.einsum("bhnd,bhmd->bhnm", phi_q, phi_k)
    return torch.einsum("bhnm,bhmd->bhnd", weights, v) / (weights.sum(-1, keepdim=True) + eps * k.shape[-2])


def random_qkv(batch: int, heads: int, tokens: int, head_dim: int, scale: float = 1.0):
    generator = torch.Generator().manual_seed(head_dim * 1000 + tokens)
    return [torch.randn(batch, heads, tokens, head_dim, generator=generator) * scale for _ in range(3)]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_op_matches_spec_in_fp32(head_dim: int) -> None:
    q, k, v = random_qkv(2, 3, 77, head_dim)
    expected = spec_attention(q, k, v)
    assert relative_error(linear_attention(q, k, v), expected) < 1e-5
    assert relative_error(linear_attention_reference(q, k, v), expected) < 1e-5
    assert relative_error(linear_attention_quadratic(q, k, v), expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_op_half_precision_against_fp32(dtype: torch.dtype, head_dim: int) -> None:
    q, k, v = random_qkv(1, 2, 300, head_dim, scale=2.0)
    expected = spec_attention(q, k, v)
    out = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert relative_error(out, expected) < HALF_TOLERANCE[dtype]


def test_op_is_a_weighted_mean() -> None:
    """Normalized attention: with constant values the output is that constant (up to the eps shrink)."""
    q, k, _ = random_qkv(1, 2, 64, 40)
    v = torch.full_like(q, 3.0)
    out = linear_attention(q, k, v)
    assert torch.allclose(out, torch.full_like(out, 3.0), rtol=1e-3)


def test_op_rejects_bad_shapes() -> None:
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="batch, heads, tokens, head_dim"):
        linear_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="same shape"):
        linear_attention(q, q[:, :, :4], q)
    with pytest.raises(ValueError, match="unknown linear-attention backend"):
        linear_attention(q, q, q, backend="nope")


def spec_module(
    state: dict[str, torch.Tensor], x: torch.Tensor, heads: int, mlp: bool = True
) -> torch.Tensor:
    """SPEC 2 step by step from a published-layout state dict (keys without the module index), fp64."""
    state = {key: value.double() for key, value in state.items()}
    x = x.double()

    def pre_projection(prefix: str) -> torch.Tensor:
        if not mlp:  # projection_mid_dim = -1: the pre-projection is the identity, so q = W_q (x + x)
            return x
        hidden = F.linear(x, state[f"{prefix}.0.weight"], state[f"{prefix}.0.bias"])
        hidden = F.layer_norm(
            hidden, hidden.shape[-1:], state[f"{prefix}.1.weight"], state[f"{prefix}.1.bias"], eps=1e-5
        )
        hidden = F.leaky_relu(hidden, 0.01)
        return F.linear(hidden, state[f"{prefix}.3.weight"], state[f"{prefix}.3.bias"])

    q = F.linear(x + pre_projection("to_q_"), state["to_q.weight"])
    k = F.linear(x + pre_projection("to_k_"), state["to_k.weight"])
    v = F.linear(x, state["to_v.weight"])
    batch, tokens, width = x.shape

    def heads_first(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, tokens, heads, width // heads).permute(0, 2, 1, 3)

    out = spec_attention(heads_first(q), heads_first(k), heads_first(v))
    out = out.permute(0, 2, 1, 3).reshape(batch, tokens, width)
    return F.linear(out, state["to_out.0.weight"], state["to_out.0.bias"])


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("mid_dim", [None, 24, -1])
def test_module_matches_spec(head_dim: int, mid_dim: int | None) -> None:
    heads = 2
    module = GeneralizedLinearAttention(heads * head_dim, heads, projection_mid_dim=mid_dim).eval()
    with torch.no_grad():
        for parameter in module.parameters():  # LayerNorm starts at 1/0: randomize to exercise it
            parameter.normal_(0, 0.2)
        x = torch.randn(2, 45, heads * head_dim)
        out = module(x)
    expected = spec_module(module.state_dict(), x, heads, mlp=mid_dim != -1)
    assert out.shape == x.shape
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_half_precision_against_fp32(dtype: torch.dtype) -> None:
    module = GeneralizedLinearAttention(160, 2).eval()
    x = torch.randn(1, 256, 160)
    with torch.no_grad():
        expected = module(x)
        out = module.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, expected) < HALF_TOLERANCE[dtype] * 2  # projections in half precision too


def test_module_state_dict_names_are_the_published_ones() -> None:
    keys = set(GeneralizedLinearAttention(64, 4).state_dict())
    expected = {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"}
    for prefix in ("to_q_", "to_k_"):
        expected |= {f"{prefix}.{i}.{kind}" for i in (0, 1, 3) for kind in ("weight", "bias")}
    assert keys == expected and len(keys) == 17
    assert set(GeneralizedLinearAttention(64, 4, projection_mid_dim=-1).state_dict()) == expected - {
        key for key in expected if key.startswith(("to_q_", "to_k_"))
    }


def test_module_accepts_spatial_input_and_ignores_cross_attention_arguments() -> None:
    module = GeneralizedLinearAttention(32, 4).eval()
    x = torch.randn(2, 32, 5, 7)
    with torch.no_grad():
        spatial = module(x)
        tokens = module(
            x.flatten(2).transpose(1, 2), encoder_hidden_states=None, attention_mask=None, scale=1.0
        )
    assert spatial.shape == x.shape
    assert torch.equal(spatial.flatten(2).transpose(1, 2), tokens)


def test_module_rejects_indivisible_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        GeneralizedLinearAttention(30, 4)


def test_word_level_tokenizer_keeps_every_word_whole() -> None:
    from linfusion.testing import byte_level_clip_tokenizer

    # "and" before "orange" (a+n ranked first) and "large" before "black" (l+a ranked first) both split
    # the later word when merges are a plain character chain.
    words = ["a", "and", "orange", "triangle", "on", "left", "the", "large", "black", "blue"]
    for order in (words, words[::-1], sorted(words, key=len)):
        tokenizer = byte_level_clip_tokenizer(words=order)
        for word in words:
            ids = tokenizer(word, add_special_tokens=False).input_ids
            assert len(ids) == 1, (order, word, tokenizer.convert_ids_to_tokens(ids))
    # Token ids follow the given order alone (no set/hash order), so a trained text encoder stays valid.
    forward = byte_level_clip_tokenizer(words=words).get_vocab()
    backward = byte_level_clip_tokenizer(words=words[::-1]).get_vocab()
    assert forward["and</w>"] < forward["orange</w>"]
    assert backward["orange</w>"] < backward["and</w>"]
