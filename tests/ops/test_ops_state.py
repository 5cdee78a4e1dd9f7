"""The state/read pair (``linear_attention_state`` / ``linear_attention_from_state``) on every CPU backend.

Each backend is compared with the fp32 reference for each half and for both composed (which must equal
``linear_attention``), with the tolerances of test_ops_backends.py: 1e-5 of the largest value in fp32;
fp16/bf16 against the fp32 reference on the same rounded inputs within 2e-3 / 1.6e-2 (the output's own
rounding with a margin; the state itself is fp32 and must match to 1e-5). The triton pair is tested in
test_ops_triton.py (it needs the interpreter).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from linfusion.bench.attention import tensor_peak_bytes_cpu
from linfusion.ops import (
    linear_attention,
    linear_attention_from_state,
    linear_attention_quadratic,
    linear_attention_reference,
    linear_attention_state,
)
from linfusion.ops.chunked import linear_attention_from_state_chunked, linear_attention_state_chunked
from linfusion.ops.reference import linear_attention_from_state_reference, linear_attention_state_reference
from support.ops import HALF_TOLERANCE, HEAD_DIMS, make_qkv, rel_err

CPU_BACKENDS = ["reference", "chunked"]
make_qkv = partial(make_qkv, scale=1.5)  # this file's inputs: N(0, 1.5^2)


def state_by_hand(k: torch.Tensor, v: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition in fp64, independent of every backend: sum_j phi(k_j)^T v_j / N, sum_j phi(k_j) / N."""
    k, v = k.double(), v.double()
    phi = torch.where(k > 0, k + 1, k.exp())
    return torch.einsum("bhnd,bhne->bhde", phi, v) / total, phi.sum(dim=2, keepdim=True) / total


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_state_and_read_match_reference_fp32(backend: str, head_dim: int) -> None:
    q, k, v = make_qkv(2, 3, 77, head_dim)
    state, key_mean = linear_attention_state(k, v, backend=backend)
    assert state.dtype == key_mean.dtype == torch.float32
    assert state.shape == (2, 3, head_dim, head_dim) and key_mean.shape == (2, 3, 1, head_dim)
    want_state, want_mean = state_by_hand(k, v, 77)
    assert rel_err(state, want_state) < 1e-5 and rel_err(key_mean, want_mean) < 1e-5
    # The read alone, from the same (reference) state, and the pair composed.
    ref_state, ref_mean = linear_attention_state_reference(k, v)
    read = linear_attention_from_state(q, ref_state, ref_mean, 1e-4, backend=backend)
    assert read.dtype == torch.float32 and read.shape == q.shape
    assert rel_err(read, linear_attention_from_state_reference(q, ref_state, ref_mean)) < 1e-5
    composed = linear_attention_from_state(q, state, key_mean, 1e-4, backend=backend)
    assert rel_err(composed, linear_attention(q, k, v, backend=backend)) < 1e-5
    assert rel_err(composed, linear_attention_quadratic(q.double(), k.double(), v.double())) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp64_stays_fp64(backend: str) -> None:
    q, k, v = make_qkv(1, 2, 30, 8, value_dim=5, dtype=torch.float64)
    state, key_mean = linear_attention_state(k, v, backend=backend)
    assert state.dtype == key_mean.dtype == torch.float64
    out = linear_attention_from_state(q, state, key_mean, backend=backend)
    assert out.dtype == torch.float64
    assert rel_err(out, linear_attention_quadratic(q, k, v)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [40, 160])
def test_half_precision(dtype: torch.dtype, head_dim: int) -> None:
    q, k, v = make_qkv(2, 2, 301, head_dim, dtype=dtype)
    ref_state, ref_mean = linear_attention_state_reference(k, v)
    expected = linear_attention_reference(q, k, v)
    state, key_mean = linear_attention_state_chunked(k, v, chunk=64)
    assert state.dtype == key_mean.dtype == torch.float32  # accumulated in fp32, never downcast
    assert rel_err(state, ref_state) < 1e-5 and rel_err(key_mean, ref_mean) < 1e-5
    out = linear_attention_from_state_chunked(q, state, key_mean, 1e-4, chunk=64)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, expected) < HALF_TOLERANCE[dtype]
    state, key_mean = linear_attention_state(k, v, backend="reference")
    out = linear_attention_from_state(q, state, key_mean, backend="reference")
    assert out.dtype == dtype and rel_err(out, expected) < HALF_TOLERANCE[dtype]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cuts", [(40,), (13, 50), (0, 1, 70)])
def test_parts_sum_to_the_whole(backend: str, cuts: tuple[int, ...]) -> None:
    """The all-reduce identity: parts' states with the whole's total_tokens sum to the whole's state."""
    q, k, v = make_qkv(2, 2, 77, 40, value_dim=24)
    bounds = [0, *cuts, 77]
    parts = [
        linear_attention_state(k[:, :, a:b], v[:, :, a:b], total_tokens=77, backend=backend)
        for a, b in zip(bounds, bounds[1:])
    ]
    state = sum(part[0] for part in parts)
    key_mean = sum(part[1] for part in parts)
    whole_state, whole_mean = state_by_hand(k, v, 77)
    assert rel_err(state, whole_state) < 1e-5 and rel_err(key_mean, whole_mean) < 1e-5
    out = linear_attention_from_state(q, state, key_mean, backend=backend)
    assert rel_err(out, linear_attention_reference(q, k, v)) < 1e-5


def test_chunked_state_over_many_chunks_and_value_dim() -> None:
    q, k, v = make_qkv(3, 2, 33, 16, value_dim=24)
    want_state, want_mean = state_by_hand(k, v, 50)
    state, key_mean = linear_attention_state_chunked(k, v, total_tokens=50, chunk=8)
    assert state.shape == (3, 2, 16, 24) and state.is_contiguous() and key_mean.is_contiguous()
    assert rel_err(state, want_state) < 1e-5 and rel_err(key_mean, want_mean) < 1e-5
    out = linear_attention_from_state_chunked(q, state, key_mean, 1e-4, chunk=8)
    assert out.shape == (3, 2, 33, 24)
    assert rel_err(out, linear_attention_from_state_reference(q, state, key_mean)) < 1e-5


def test_head_split_strides() -> None:
    """Heads split from a (B, N, H*d) projection are read in place; the read keeps q's layout."""
    batch, tokens, heads, d = 2, 50, 4, 40
    x = torch.randn(batch, tokens, 3 * heads * d, generator=torch.Generator().manual_seed(5))
    q, k, v = (t.view(batch, tokens, heads, d).transpose(1, 2) for t in x.chunk(3, dim=-1))
    assert not q.is_contiguous()
    ref_state, ref_mean = linear_attention_state_reference(k, v)
    state, key_mean = linear_attention_state_chunked(k, v, chunk=16)
    assert rel_err(state, ref_state) < 1e-5 and rel_err(key_mean, ref_mean) < 1e-5
    out = linear_attention_from_state_chunked(q, state, key_mean, 1e-4, chunk=16)
    assert out.stride() == torch.empty_like(q).stride()
    assert rel_err(out, linear_attention_reference(q, k, v)) < 1e-5


def test_auto_follows_select_backend_and_gradients_fall_back() -> None:
    q, k, v = make_qkv(1, 8, 1024, 40)  # 2^18 + elements: auto is chunked on CPU
    state, key_mean = linear_attention_state(k, v)
    assert torch.equal(state, linear_attention_state(k, v, backend="chunked")[0])
    out = linear_attention_from_state(q, state, key_mean)
    assert torch.equal(out, linear_attention_from_state(q, state, key_mean, backend="chunked"))
    # With a gradient wanted, auto takes the differentiable reference; a forced kernel refuses.
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad_state, grad_mean = linear_attention_state(leaves[1], leaves[2])
    linear_attention_from_state(leaves[0], grad_state, grad_mean).sum().backward()
    exact = [t.clone().requires_grad_() for t in (q, k, v)]
    linear_attention_reference(*exact).sum().backward()
    for got, want in zip(leaves, exact):
        assert rel_err(got.grad, want.grad) < 1e-6
    with pytest.raises(ValueError, match="not differentiable"):
        linear_attention_state(leaves[1], leaves[2], backend="chunked")
    with pytest.raises(ValueError, match="not differentiable"):
        linear_attention_from_state(leaves[0], state, key_mean, backend="chunked")
    with torch.no_grad():  # the engines' case: the kernels run although the leaves require grad
        no_grad_state = linear_attention_state(leaves[1], leaves[2], backend="chunked")[0]
    assert torch.equal(no_grad_state, state)


def test_auto_on_meta_traces_the_reference() -> None:
    """On meta (the cost models' traces) auto runs the reference, whose matmuls FlopCounterMode counts."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.empty(1, 8, 1024, 40, device="meta") for _ in range(3))
    counted = {}
    for backend in ("auto", "reference"):
        with FlopCounterMode(display=False) as counter:
            state, key_mean = linear_attention_state(k, v, backend=backend)
            out = linear_attention_from_state(q, state, key_mean, backend=backend)
        counted[backend] = counter.get_total_flops()
    assert out.shape == q.shape and state.shape == (1, 8, 40, 40)
    assert counted["auto"] == counted["reference"] >= 2 * (2 * 8 * 1024 * 40 * 40)


def test_bad_inputs_raise() -> None:
    q, k, v = make_qkv(1, 2, 10, 8)
    state, key_mean = linear_attention_state(k, v)
    with pytest.raises(ValueError, match="unknown linear-attention backend"):
        linear_attention_state(k, v, backend="cuda")
    with pytest.raises(ValueError, match="unknown linear-attention backend"):
        linear_attention_from_state(q, state, key_mean, backend="fast")
    with pytest.raises(ValueError, match="tokens, head_dim"):
        linear_attention_state(k[0], v[0])
    with pytest.raises(ValueError, match="same \\(batch, heads, tokens\\)"):
        linear_attention_state(k, v[:, :, :5])
    with pytest.raises(ValueError, match="at least one token"):
        linear_attention_state(k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="total_tokens"):
        linear_attention_state(k, v, total_tokens=9)
    with pytest.raises(ValueError, match="state must be"):
        linear_attention_from_state(q, state[:, :1], key_mean)
    with pytest.raises(ValueError, match="state must be"):
        linear_attention_from_state(q, state, key_mean.transpose(-1, -2))
    # An empty part of a longer sequence contributes nothing; empty queries read nothing.
    empty_state, empty_mean = linear_attention_state(k[:, :, :0], v[:, :, :0], total_tokens=10)
    assert not empty_state.any() and not empty_mean.any()
    assert linear_attention_from_state(q[:, :, :0], state, key_mean, backend="chunked").shape == (1, 2, 0, 8)


def test_million_tokens_fp16_no_overflow() -> None:
    """2^20 tokens in fp16: the chunked pair accumulates in fp32, so nothing overflows fp16's 65504."""
    q, k, v = make_qkv(1, 1, 1 << 20, 8, dtype=torch.float16)
    k = k + 3.0  # phi(k) ~ 4: the raw key sum reaches ~4e6, far beyond fp16's range
    state, key_mean = linear_attention_state(k, v, backend="chunked")
    want_state, want_mean = state_by_hand(k, v, 1 << 20)
    assert torch.isfinite(state).all() and torch.isfinite(key_mean).all()
    assert rel_err(state, want_state) < 1e-4 and rel_err(key_mean, want_mean) < 1e-5
    out = linear_attention_from_state(q, state, key_mean, backend="chunked")
    assert torch.isfinite(out).all()
    assert rel_err(out, linear_attention_reference(q, k, v)) < HALF_TOLERANCE[torch.float16]


def test_half_inputs_never_copied_whole_to_fp32() -> None:
    """fp16 inputs: the chunked pair's peak extra memory stays far below one fp32 copy of k (or q), which
    the reference makes (and exceeds); the read's peak is its fp16 output plus chunk-sized scratch."""
    q, k, v = make_qkv(1, 8, 8192, 40, dtype=torch.float16)
    fp32_copy_bytes = k.numel() * 4
    output_bytes = q.numel() * q.element_size()
    state, key_mean = linear_attention_state(k, v, backend="chunked")

    def read() -> torch.Tensor:
        return linear_attention_from_state(q, state, key_mean, backend="chunked")

    read()  # warm-up: one-time allocations of the first call are not the op's
    state_peak = tensor_peak_bytes_cpu(lambda: linear_attention_state(k, v, backend="chunked"))
    assert state_peak <= 0.25 * fp32_copy_bytes
    assert tensor_peak_bytes_cpu(read) <= output_bytes + 0.25 * fp32_copy_bytes
    reference_peak = tensor_peak_bytes_cpu(lambda: linear_attention_state(k, v, backend="reference"))
    assert reference_peak > fp32_copy_bytes
