"""Accuracy checks: the SDPA wiring check and fp16/bf16 inputs against the fp32 reference."""

from __future__ import annotations

import gc
import time
from typing import Any

import torch
import torch.nn.functional as F

from ...ops import linear_attention, linear_attention_reference
from .config import DTYPES
from .timing import make_qkv, relative_error, synchronize


def sdpa_agreement(device: torch.device, seed: int = 0, tokens: int = 256, head_dim: int = 40) -> dict:
    """A case where softmax and linear attention must agree: identical keys make every attention
    weight equal, so both outputs are the mean of v (linear attention up to its eps shrink). Checks that
    the benchmark feeds both ops the same (B, H, N, d) tensors."""
    q, k, v = make_qkv(1, 2, tokens, head_dim, torch.float32, device, seed)
    k = k[:, :, :1].expand_as(k).contiguous()
    lin = linear_attention(q, k, v)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    mean = v.mean(dim=2, keepdim=True).expand_as(v)
    return {
        "tokens": tokens,
        "head_dim": head_dim,
        "linfusion_vs_sdpa_rel_err": relative_error(lin, sdpa),
        "sdpa_vs_mean_rel_err": relative_error(sdpa, mean),
        "linfusion_vs_mean_rel_err": relative_error(lin, mean),
    }


def _reference_by_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The fp32 reference, one head at a time (bounded memory at a million tokens)."""
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            sl = (slice(b, b + 1), slice(h, h + 1))
            out[sl] = linear_attention_reference(q[sl], k[sl], v[sl])
    return out


def half_precision_accuracy(
    tokens: int, head_dim: int, heads: int, batch: int, dtypes: list[str], device: torch.device, seed: int
) -> list[dict[str, Any]]:
    """fp16/bf16 inputs through ``auto`` against the fp32 reference on the same (rounded) inputs."""
    results = []
    for name in dtypes:
        dtype = DTYPES[name]
        q, k, v = make_qkv(batch, heads, tokens, head_dim, dtype, device, seed)
        start = time.perf_counter()
        out = linear_attention(q, k, v)
        synchronize(device)
        seconds = time.perf_counter() - start
        expected = _reference_by_head(q, k, v)
        results.append(
            {
                "dtype": name,
                "tokens": tokens,
                "head_dim": head_dim,
                "heads": heads,
                "backend": "auto",
                "finite": bool(torch.isfinite(out).all().item()),
                "max_rel_err": relative_error(out, expected),
                "seconds_single_run": seconds,
            }
        )
        del q, k, v, out, expected
        gc.collect()
    return results
