"""Inputs and error measures shared by the kernel tests (tests/ops/)."""

from __future__ import annotations

import torch

HEAD_DIMS = [40, 64, 80, 160]  # every head dim of SD-1.x / SD-2.x / SD-XL self-attention
HALF_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative, against the fp32 reference


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute error relative to the largest expected value, in fp64."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def make_qkv(
    batch: int,
    heads: int,
    tokens: int,
    head_dim: int,
    value_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Seeded q, k, v of shape (batch, heads, tokens, dim), drawn in fp64 and rounded to ``dtype``."""
    generator = torch.Generator().manual_seed(seed * 7919 + tokens * 31 + head_dim)
    dims = (head_dim, head_dim, value_dim or head_dim)
    return [
        (torch.randn(batch, heads, tokens, dim, generator=generator, dtype=torch.float64) * scale).to(dtype)
        for dim in dims
    ]
