"""The triton kernels against the reference.

On a CUDA machine these tests run the compiled kernels. Without a GPU they run under triton's CPU
interpreter (``TRITON_INTERPRET=1``) on small shapes, which checks the indexing, masking, tiling of head
dims and the backward algebra, but not compiled-GPU behaviour (tf32 products, register limits, speed).
The interpreter must be switched on before triton is first imported, and importing linfusion (through
diffusers and torch) already imports triton, so on CPU ``test_triton_interpreter_suite`` re-runs this
file in a child pytest process with ``TRITON_INTERPRET=1``. Everything skips cleanly when triton is not
installed (it is the optional ``triton`` extra), except where ``LINFUSION_REQUIRE_TRITON=1`` says the
kernels must be checked (``make test``, and so CI): there a missing triton fails.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linfusion.ops import (
    linear_attention,
    linear_attention_from_state,
    linear_attention_reference,
    linear_attention_state,
    select_backend,
)
from linfusion.ops.reference import linear_attention_from_state_reference, linear_attention_state_reference

if importlib.util.find_spec("triton") is None:
    if os.environ.get("LINFUSION_REQUIRE_TRITON") == "1":
        raise RuntimeError(
            "triton is not installed but LINFUSION_REQUIRE_TRITON=1: pip install -e '.[triton]'"
        )
    pytest.skip("triton is not installed (optional 'triton' extra)", allow_module_level=True)

HEAD_DIMS = [40, 64, 80, 160]
HALF_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def device() -> str:
    if HAS_CUDA:
        return "cuda"
    if not INTERPRETED:
        pytest.skip("no GPU: run under the triton interpreter by test_triton_interpreter_suite")
    return "cpu"


@pytest.mark.slow
def test_triton_interpreter_suite() -> None:
    """Without a GPU: this file's tests in a child process with the interpreter on (minutes on 2 cores)."""
    if HAS_CUDA or INTERPRETED:
        pytest.skip("the tests of this file run directly here")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 22, report


def make_qkv(batch, heads, tokens, head_dim, device, dtype=torch.float32, scale=1.5, value_dim=None):
    generator = torch.Generator().manual_seed(tokens * 131 + head_dim)
    dims = (head_dim, head_dim, value_dim or head_dim)
    return [
        (torch.randn(batch, heads, tokens, dim, generator=generator) * scale).to(device=device, dtype=dtype)
        for dim in dims
    ]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_triton_forward_fp32(device: str, head_dim: int) -> None:
    q, k, v = make_qkv(2, 2, 97, head_dim, device)  # 97: not a multiple of the 64-token blocks
    out = linear_attention(q, k, v, backend="triton")
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert rel_err(out, linear_attention_reference(q, k, v)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [40, 160])
def test_triton_forward_half(device: str, dtype: torch.dtype, head_dim: int) -> None:
    q, k, v = make_qkv(1, 2, 130, head_dim, device, dtype=dtype)
    out = linear_attention(q, k, v, backend="triton")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, linear_attention_reference(q, k, v)) < HALF_TOLERANCE[dtype]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_triton_gradients_match_reference(device: str, head_dim: int) -> None:
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 1, 75, head_dim, device))
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(device)
    got = torch.autograd.grad(linear_attention(q, k, v, backend="triton"), (q, k, v), grad)
    want = torch.autograd.grad(linear_attention_reference(q, k, v), (q, k, v), grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_triton_strided_inputs_and_value_dim(device: str) -> None:
    batch, tokens, heads, d = 2, 70, 2, 40
    x = torch.randn(batch, tokens, 3 * heads * d, device=device)
    q, k, v = (t.view(batch, tokens, heads, d).transpose(1, 2) for t in x.chunk(3, dim=-1))
    assert rel_err(linear_attention(q, k, v, backend="triton"), linear_attention_reference(q, k, v)) < 1e-5
    q2, k2, v2 = make_qkv(1, 2, 33, 16, device, value_dim=24)
    assert (
        rel_err(linear_attention(q2, k2, v2, backend="triton"), linear_attention_reference(q2, k2, v2)) < 1e-5
    )


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_triton_state_and_read_fp32(device: str, head_dim: int) -> None:
    """Each half against the reference, and both composed against the whole op."""
    q, k, v = make_qkv(1, 2, 70, head_dim, device)
    state, key_mean = linear_attention_state(k, v, backend="triton")
    assert state.dtype == key_mean.dtype == torch.float32
    assert state.shape == (1, 2, head_dim, head_dim) and key_mean.shape == (1, 2, 1, head_dim)
    ref_state, ref_mean = linear_attention_state_reference(k, v)
    assert rel_err(state, ref_state) < 1e-5 and rel_err(key_mean, ref_mean) < 1e-5
    read = linear_attention_from_state(q, ref_state, ref_mean, backend="triton")
    assert read.dtype == torch.float32
    assert rel_err(read, linear_attention_from_state_reference(q, ref_state, ref_mean)) < 1e-5
    composed = linear_attention_from_state(q, state, key_mean, backend="triton")
    assert rel_err(composed, linear_attention(q, k, v, backend="triton")) < 1e-5


def test_triton_state_parts_sum_to_the_whole(device: str) -> None:
    """The all-reduce identity with total_tokens, a value head dim of its own and head-split strides."""
    batch, tokens, heads, d = 1, 90, 2, 16
    x = torch.randn(batch, tokens, 2 * heads * d, generator=torch.Generator().manual_seed(4)).to(device)
    k = x[..., : heads * d].view(batch, tokens, heads, d).transpose(1, 2)
    v = x[..., heads * d :].reshape(batch, tokens, heads * d)[..., : heads * 12]
    v = v.view(batch, tokens, heads, 12).transpose(1, 2)  # e = 12 != d, strided
    parts = [
        linear_attention_state(k[:, :, a:b], v[:, :, a:b], total_tokens=tokens, backend="triton")
        for a, b in ((0, 17), (17, 80), (80, 90))
    ]
    ref_state, ref_mean = linear_attention_state_reference(k, v)
    assert rel_err(sum(p[0] for p in parts), ref_state) < 1e-5
    assert rel_err(sum(p[1] for p in parts), ref_mean) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_state_and_read_half(device: str, dtype: torch.dtype) -> None:
    q, k, v = make_qkv(1, 2, 80, 40, device, dtype=dtype)
    state, key_mean = linear_attention_state(k, v, backend="triton")
    assert state.dtype == torch.float32  # tf32 products, fp32 accumulation
    assert rel_err(state, linear_attention_state_reference(k, v)[0]) < HALF_TOLERANCE[dtype]
    out = linear_attention_from_state(q, state, key_mean, backend="triton")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, linear_attention_reference(q, k, v)) < HALF_TOLERANCE[dtype]


def test_triton_pair_is_not_differentiable(device: str) -> None:
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 1, 20, 8, device))
    with pytest.raises(ValueError, match="not differentiable"):
        linear_attention_state(k, v, backend="triton")
    with torch.no_grad():
        state, key_mean = linear_attention_state(k, v, backend="triton")
    with pytest.raises(ValueError, match="not differentiable"):
        linear_attention_from_state(q, state, key_mean, backend="triton")


def test_auto_does_not_pick_unvalidated_triton(device: str) -> None:
    q = torch.empty(1, 8, 4096, 40, device=device)
    assert select_backend(q) == "chunked"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_triton_on_gpu_large(dtype: torch.dtype, head_dim: int) -> None:
    heads = 10 if head_dim == 64 else 8
    q, k, v = (t.requires_grad_() for t in make_qkv(2, heads, 16411, head_dim, "cuda", dtype=dtype))
    tol = 1e-5 if dtype == torch.float32 else HALF_TOLERANCE[dtype]
    out = linear_attention(q, k, v, backend="triton")
    assert torch.isfinite(out).all()
    assert rel_err(out, linear_attention_reference(q, k, v)) < tol
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    exact = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(linear_attention_reference(*exact), exact, grad.float())
    for g, w in zip(got, want):
        assert rel_err(g, w) < (1e-4 if dtype == torch.float32 else HALF_TOLERANCE[dtype])
