"""Plain, readable reference of LinFusion's normalized non-causal linear attention.

This is the oracle every faster backend is tested against. It follows the published model's formula
literally, in its order of operations, and computes in fp32 (or fp64 when given fp64); its results stay
in that dtype (the dispatcher :func:`linfusion.ops.linear_attention` casts back to the input dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(t) = elu(t) + 1: strictly positive, so the attention weights form a proper mean."""
    return F.elu(x) + 1.0


def linear_attention_state_reference(
    k: torch.Tensor, v: torch.Tensor, total_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The key/value summary every query reads: ``(S, key_mean)``, fp32 (fp64 for fp64 inputs).

    S = (phi(K)^T / sqrt(N)) @ (V / sqrt(N)) and key_mean = sum_j phi(k_j) / N, shapes (B, H, d, e) and
    (B, H, 1, d). ``total_tokens`` is N; when the keys are one part of a longer sequence (spatial
    parallelism) pass the whole sequence's N: the parts' results then *sum* to the whole's, so an
    all-reduce of both tensors gives every part the global state. Default: k's own token count.
    """
    compute_dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    k, v = k.to(compute_dtype), v.to(compute_dtype)
    phi_k = feature_map(k)
    if total_tokens is None:
        n = k.shape[-2]
        key_mean = phi_k.mean(dim=-2, keepdim=True)  # (B, H, 1, d)
    else:
        n = int(total_tokens)
        key_mean = phi_k.sum(dim=-2, keepdim=True) / n
    scale = n**-0.5
    state = (phi_k.transpose(-1, -2) * scale) @ (v * scale)  # (B, H, d, e) == phi(K)^T V / N
    return state, key_mean


def linear_attention_from_state_reference(
    q: torch.Tensor, state: torch.Tensor, key_mean: torch.Tensor, eps: float = 1e-4
) -> torch.Tensor:
    """out_i = phi(q_i) @ S / (phi(q_i) . key_mean + eps), computed and returned in the state's dtype."""
    phi_q = feature_map(q.to(state.dtype))
    normalizer = phi_q @ key_mean.transpose(-1, -2) + eps  # (B, H, N, 1)
    return (phi_q @ state) / normalizer


def linear_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-4
) -> torch.Tensor:
    """Normalized non-causal linear attention on (B, H, N, d) tensors, before the feature map.

    out_i = phi(q_i) @ S / (phi(q_i) . mean_j phi(k_j) + eps), with S = (phi(K)^T / sqrt(N)) @ (V / sqrt(N)).
    Half-precision inputs are computed in fp32 and the result is returned in fp32 (fp64 for fp64 inputs);
    :func:`linfusion.ops.linear_attention` casts it back to the input dtype.
    The two halves are :func:`linear_attention_state_reference` and
    :func:`linear_attention_from_state_reference` (one formula for the whole op and for its split form).
    """
    state, key_mean = linear_attention_state_reference(k, v)
    return linear_attention_from_state_reference(q, state, key_mean, eps)


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
