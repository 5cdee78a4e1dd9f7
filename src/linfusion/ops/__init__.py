"""Linear-attention kernels behind one signature, and their dispatch.

``linear_attention(q, k, v, eps, backend)`` is the single entry point: every backend computes the same
normalized non-causal linear attention (SPEC section 2) and is tested against
:func:`linfusion.ops.reference.linear_attention_reference`.
"""

from __future__ import annotations

import torch

from .reference import feature_map, linear_attention_quadratic, linear_attention_reference

BACKENDS = ("auto", "reference")

__all__ = [
    "BACKENDS",
    "feature_map",
    "linear_attention",
    "linear_attention_quadratic",
    "linear_attention_reference",
]


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"linear_attention expects (batch, heads, tokens, head_dim) tensors; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape != k.shape or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"q and k must have the same shape and v the same (batch, heads, tokens); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-4, backend: str = "auto"
) -> torch.Tensor:
    """Normalized non-causal linear attention (LinFusion), inputs taken *before* the feature map.

    Args:
        q, k, v: (B, H, N, d) tensors; phi = elu + 1 is applied to q and k here.
        eps: added to the normalizer phi(q_i) . mean_j phi(k_j).
        backend: ``"auto"`` picks the best available backend for the device, dtype and shape.

    Returns:
        (B, H, N, d) in the input dtype; statistics are accumulated in fp32 for fp16/bf16 inputs.
    """
    _check_inputs(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"unknown linear-attention backend {backend!r}; choose one of {BACKENDS}")
    return linear_attention_reference(q, k, v, eps).to(q.dtype)
