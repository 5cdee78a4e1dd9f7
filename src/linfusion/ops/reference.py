"""Plain, readable reference of LinFusion's normalized non-causal linear attention.

This is the oracle every faster backend is tested against. It follows SPEC section 2 literally, in the
same order of operations as the published model, and computes in fp32 (or fp64 when given fp64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(t) = elu(t) + 1: strictly positive, so the attention weights form a proper mean."""
    return F.elu(x) + 1.0


def linear_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-4
) -> torch.Tensor:
    """Normalized non-causal linear attention on (B, H, N, d) tensors, before the feature map.

    out_i = phi(q_i) @ S / (phi(q_i) . mean_j phi(k_j) + eps), with S = (phi(K)^T / sqrt(N)) @ (V / sqrt(N)).
    Half-precision inputs are computed in fp32 and the result is cast back to the input dtype.
    """
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    n = k.shape[-2]
    phi_q = feature_map(q)
    phi_k = feature_map(k)
    key_mean = phi_k.mean(dim=-2, keepdim=True)  # (B, H, 1, d)
    normalizer = phi_q @ key_mean.transpose(-1, -2) + eps  # (B, H, N, 1)
    scale = n**-0.5
    state = (phi_k.transpose(-1, -2) * scale) @ (v * scale)  # (B, H, d, d) == phi(K)^T V / N
    return (phi_q @ state) / normalizer


def linear_attention_quadratic(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-4
) -> torch.Tensor:
    """The same attention written as an explicit N x N weight matrix (an independent check, small N only).

    out_i = sum_j phi(q_i).phi(k_j) v_j / (sum_j phi(q_i).phi(k_j) + eps * N).
    """
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    n = k.shape[-2]
    weights = feature_map(q) @ feature_map(k).transpose(-1, -2)  # (B, H, N, N)
    return (weights @ v) / (weights.sum(dim=-1, keepdim=True) + eps * n)
