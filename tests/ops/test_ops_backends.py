"""The pure-PyTorch backends and the dispatch against the reference (SPEC section 2).

Tolerances: fp32 results must match the fp32 reference to 1e-5 of the largest output value; fp16/bf16
inputs are compared with the fp32 reference on the same (rounded) inputs, so the only error left is the
computation in fp32 plus the final rounding of the output (fp16: 2^-11 ~ 4.9e-4, bf16: 2^-8 ~ 3.9e-3,
relative); the bounds below leave a factor of about four over that rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linfusion.bench.attention import tensor_peak_bytes_cpu
from linfusion.ops import (
    BACKENDS,
    CPU_SMALL_PROBLEM_ELEMENTS,
    linear_attention,
    linear_attention_quadratic,
    linear_attention_reference,
    select_backend,
)
from linfusion.ops.chunked import default_chunk_size, feature_map_, linear_attention_chunked
from support.ops import HALF_TOLERANCE, HEAD_DIMS, make_qkv, rel_err

HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("chunk", [16, None])
def test_chunked_matches_reference_fp32(head_dim: int, chunk: int | None) -> None:
    # 77 tokens: with chunks of 16 the last chunk is partial; None is the default (single chunk here).
    q, k, v = make_qkv(2, 3, 77, head_dim, scale=2.0)
    out = linear_attention_chunked(q, k, v, 1e-4, chunk)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert rel_err(out, linear_attention_reference(q, k, v)) < 1e-5
    # and against the independent N x N formulation in fp64
    assert rel_err(out, linear_attention_quadratic(q.double(), k.double(), v.double())) < 1e-5


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_chunked_half_precision(dtype: torch.dtype, head_dim: int) -> None:
    q, k, v = make_qkv(2, 2, 301, head_dim, dtype=dtype, scale=2.0)
    out = linear_attention_chunked(q, k, v, 1e-4, 64)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, linear_attention_reference(q, k, v)) < HALF_TOLERANCE[dtype]


def test_chunked_gradcheck_fp64() -> None:
    """Analytic recomputing backward vs finite differences, several chunks, d != e."""
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 7, 3, value_dim=4, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: linear_attention_chunked(a, b, c, 1e-4, 3), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: linear_attention(a, b, c, backend="chunked"), (q, k, v))


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_chunked_gradients_match_reference(head_dim: int) -> None:
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 45, head_dim, scale=1.5))
    grad = torch.randn(2, 2, 45, head_dim, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(linear_attention_chunked(q, k, v, 1e-4, 16), (q, k, v), grad)
    want = torch.autograd.grad(linear_attention_reference(q, k, v), (q, k, v), grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_chunked_half_precision_gradients(dtype: torch.dtype) -> None:
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 150, 40, dtype=dtype))
    grad = torch.randn(1, 2, 150, 40, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = torch.autograd.grad(linear_attention_chunked(q, k, v, 1e-4, 64), (q, k, v), grad)
    exact = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(linear_attention_reference(*exact), exact, grad.float())
    for g, w, t in zip(got, want, (q, k, v)):
        assert g.dtype == dtype and g.shape == t.shape
        assert rel_err(g, w) < HALF_TOLERANCE[dtype]


def test_non_contiguous_heads_and_value_dim() -> None:
    """Heads split from a (B, N, H*d) projection are used in place; the output keeps that layout."""
    batch, tokens, heads, d = 2, 50, 4, 40
    x = torch.randn(batch, tokens, 3 * heads * d)
    q, k, v = (t.view(batch, tokens, heads, d).transpose(1, 2) for t in x.chunk(3, dim=-1))
    assert not q.is_contiguous()
    for chunk in (16, None):
        out = linear_attention_chunked(q, k, v, 1e-4, chunk)
        assert out.stride() == torch.empty_like(q).stride()
        assert rel_err(out, linear_attention_reference(q, k, v)) < 1e-5
    q2, k2, v2 = make_qkv(3, 2, 33, 16, value_dim=24)
    assert (
        rel_err(linear_attention_chunked(q2, k2, v2, 1e-4, 8), linear_attention_reference(q2, k2, v2)) < 1e-5
    )


def test_feature_map_never_rounds_to_zero() -> None:
    """elu(t) + 1 in bf16 (or expm1 + 1 in fp32) is exactly 0 for very negative t; ours is exp(t)."""
    x = torch.tensor([-60.0, -30.0, -17.5, -10.0, -6.0, -1.0, 0.0, 0.5, 3.0]).to(torch.bfloat16)
    out = torch.empty(x.shape)
    feature_map_(x, out, torch.empty(x.shape))
    exact = torch.where(x.double() > 0, x.double() + 1, x.double().exp())
    assert (out > 0).all()
    assert ((out.double() - exact).abs() / exact).max().item() < 1e-6
    assert (F.elu(x) + 1 == 0).any()  # the trap this guards against


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shift", [-12.0, -20.0])
def test_strongly_negative_keys(dtype: torch.dtype, shift: float) -> None:
    """Keys around -12 / -20: phi(k) ~ 6e-6 / 2e-9 is tiny but not zero, and it still decides the output.
    At -20 even fp32 expm1(t) + 1 (the reference's elu + 1) rounds to exactly 0 and gets it wrong."""
    q, k, v = make_qkv(1, 2, 200, 40, dtype=torch.float64)
    k = k * 0.5 + shift
    q, k, v = (t.to(dtype) for t in (q, k, v))
    expected = linear_attention_quadratic(q.double(), k.double(), v.double())
    tolerance = HALF_TOLERANCE[dtype] if dtype == torch.bfloat16 else 1e-5
    assert rel_err(linear_attention(q, k, v, backend="chunked"), expected) < tolerance
    if shift == -20.0:
        assert rel_err(linear_attention(q, k, v, backend="reference"), expected) > 0.5


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_million_tokens_half_precision(dtype: torch.dtype) -> None:
    """2^20 tokens: fp32 accumulation keeps fp16/bf16 finite and within 2e-2 of the fp32 reference."""
    q, k, v = make_qkv(1, 1, 1 << 20, 40, dtype=dtype, scale=2.0)
    out = linear_attention(q, k, v)
    assert torch.isfinite(out).all()
    assert rel_err(out, linear_attention_reference(q, k, v)) < 2e-2


def test_auto_dispatch_on_cpu() -> None:
    q, k, v = make_qkv(1, 2, 40, 8)
    assert select_backend(q) == "reference"  # tiny: the reference's few big ops are faster
    assert torch.equal(linear_attention(q, k, v), linear_attention(q, k, v, backend="reference"))
    big = torch.empty(1, 8, CPU_SMALL_PROBLEM_ELEMENTS // 320 + 1, 40)
    assert select_backend(big) == "chunked"
    assert rel_err(linear_attention(q, k, v, backend="chunked"), linear_attention(q, k, v)) < 1e-5
    assert set(BACKENDS) == {"auto", "chunked", "triton", "reference"}
    with pytest.raises(ValueError, match="unknown linear-attention backend"):
        linear_attention(q, k, v, backend="cuda")


@pytest.mark.parametrize("tokens", [64, 1024, 16384, 1 << 20])
@pytest.mark.parametrize("itemsize", [2, 4])
def test_default_chunk_respects_memory_cap(tokens: int, itemsize: int) -> None:
    d, bh = 40, 8
    chunk = default_chunk_size(bh, tokens, d, torch.device("cpu"), itemsize)
    assert 1 <= chunk <= tokens
    if tokens >= 1024:  # two fp32 scratch buffers under a tenth of q + k + v
        assert 2 * bh * chunk * (d + 1) * 4 <= 0.1 * 3 * bh * tokens * d * itemsize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1024, 4096])
def test_chunked_peak_memory(dtype: torch.dtype, tokens: int) -> None:
    """Peak extra tensor memory (output included) <= 0.5x q+k+v forward, <= 1.6x forward+backward
    (the three gradients and the output alone are 1.33x); the reference needs over 1x for the forward.
    From ~1,000 tokens on: below that the fixed (d, d + 1) state per head is no longer negligible."""
    q, k, v = make_qkv(1, 8, tokens, 40, dtype=dtype)
    qkv_bytes = 3 * q.numel() * q.element_size()

    def forward() -> torch.Tensor:
        return linear_attention(q, k, v, backend="chunked")

    forward()
    assert tensor_peak_bytes_cpu(forward) <= 0.5 * qkv_bytes
    assert tensor_peak_bytes_cpu(lambda: linear_attention(q, k, v, backend="reference")) > qkv_bytes
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)

    def forward_backward() -> None:
        linear_attention(*leaves, backend="chunked").backward(grad)
        for t in leaves:
            t.grad = None

    forward_backward()
    assert tensor_peak_bytes_cpu(forward_backward) <= 1.6 * qkv_bytes
