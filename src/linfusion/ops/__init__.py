"""Linear-attention kernels behind one signature, and their dispatch.

``linear_attention(q, k, v, eps, backend)`` is the single entry point: every backend computes the same
normalized non-causal linear attention (docs/kernels.md) and is tested against
:func:`linfusion.ops.reference.linear_attention_reference`. Its two halves,
``linear_attention_state(k, v, total_tokens, backend)`` (the keys' and values' summary) and
``linear_attention_from_state(q, state, key_mean, eps, backend)`` (the queries reading it), are dispatched
the same way; the engines that see the keys in parts (banded UNet, tiled VAE, spatial parallelism) use them.

Backends:

* ``"chunked"`` -- pure PyTorch, two streaming passes with chunk-sized scratch and a recomputing
  backward (:mod:`linfusion.ops.chunked`). Default on CPU and the fallback everywhere.
* ``"triton"`` -- fused GPU kernels (:mod:`linfusion.ops.triton_backend`); needs the ``triton`` extra.
* ``"reference"`` -- the plain oracle (whole-sequence fp32 temporaries, autograd through it).
* ``"auto"`` -- see :func:`select_backend`.
"""

from __future__ import annotations

import torch

from .chunked import (
    linear_attention_chunked,
    linear_attention_from_state_chunked,
    linear_attention_state_chunked,
)
from .reference import (
    feature_map,
    linear_attention_from_state_reference,
    linear_attention_quadratic,
    linear_attention_reference,
    linear_attention_state_reference,
)

BACKENDS = ("auto", "chunked", "triton", "reference")

# ``auto`` only chooses the triton kernels once they have been validated on a real GPU against the
# reference (so far they have only run under triton's CPU interpreter); until then ``auto`` uses
# ``chunked`` on every device and ``backend="triton"`` must be asked for explicitly.
TRITON_VALIDATED_ON_GPU = False

# On CPU, below this many elements per input (e.g. 8 heads x 40 x 512 tokens) the reference's few large
# ops beat the chunked loop's per-chunk dispatch (measured on 2 cores: 0.3 vs 1.2 ms at 8 x 128 x 80);
# from about twice that on, chunked wins (2.1 vs 3.8 ms at 8 x 1,024 x 40). Memory is a few MB here.
CPU_SMALL_PROBLEM_ELEMENTS = 1 << 18

__all__ = [
    "BACKENDS",
    "available_backends",
    "feature_map",
    "linear_attention",
    "linear_attention_chunked",
    "linear_attention_from_state",
    "linear_attention_from_state_chunked",
    "linear_attention_from_state_reference",
    "linear_attention_quadratic",
    "linear_attention_reference",
    "linear_attention_state",
    "linear_attention_state_chunked",
    "linear_attention_state_reference",
    "select_backend",
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
    if q.shape[2] == 0:
        raise ValueError("linear_attention needs at least one token")


def _triton_usable(q: torch.Tensor) -> bool:
    try:
        from . import triton_backend
    except Exception:  # noqa: BLE001 - a broken triton install must not break the package
        return False
    return triton_backend.supports(q) and q.dtype != torch.float64


def available_backends(q: torch.Tensor | None = None) -> tuple[str, ...]:
    """Concrete backends that can run here (for q's device when given)."""
    names = ["chunked", "reference"]
    if q is not None and _triton_usable(q):
        names.insert(1, "triton")
    elif q is None:
        try:
            from . import triton_backend

            if triton_backend.AVAILABLE:
                names.insert(1, "triton")
        except Exception:  # noqa: BLE001
            pass
    return tuple(names)


def select_backend(q: torch.Tensor) -> str:
    """The backend ``auto`` uses for q's device, dtype and shape.

    * CUDA: ``triton`` once validated on a GPU (see ``TRITON_VALIDATED_ON_GPU``), else ``chunked`` with
      large chunks.
    * CPU: ``reference`` for tiny problems (at most ``CPU_SMALL_PROBLEM_ELEMENTS`` elements in q), where it
      is faster, else ``chunked`` (2-3x faster than the reference at 16k-65k tokens, a fraction of its
      memory).
    * Every other device: ``chunked``.
    """
    if q.is_cuda and TRITON_VALIDATED_ON_GPU and _triton_usable(q):
        return "triton"
    if q.device.type == "cpu" and q.numel() <= CPU_SMALL_PROBLEM_ELEMENTS:
        return "reference"
    return "chunked"


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-4, backend: str = "auto"
) -> torch.Tensor:
    """Normalized non-causal linear attention (LinFusion), inputs taken *before* the feature map.

    Args:
        q, k, v: (B, H, N, d) tensors (v may have its own head dim); phi = elu + 1 is applied to q and k
            here. Any strides (e.g. heads split from a (B, N, H*d) projection) are used without copies.
        eps: added to the normalizer phi(q_i) . mean_j phi(k_j).
        backend: ``"auto"`` picks the best available backend for the device, dtype and shape
            (:func:`select_backend`); ``"chunked"``, ``"triton"`` or ``"reference"`` force one.

    Returns:
        (B, H, N, e) in q's dtype; statistics are accumulated in fp32 for fp16/bf16 inputs.
        Differentiable with respect to q, k and v with every backend.
    """
    _check_inputs(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"unknown linear-attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = select_backend(q)
    if backend == "chunked":
        return linear_attention_chunked(q, k, v, eps)
    if backend == "triton":
        from .triton_backend import linear_attention_triton

        return linear_attention_triton(q, k, v, eps)
    return linear_attention_reference(q, k, v, eps).to(q.dtype)


def _check_state_inputs(k: torch.Tensor, v: torch.Tensor, total_tokens: int | None) -> None:
    if k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"linear_attention_state expects (batch, heads, tokens, head_dim) tensors; got shapes "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"k and v must have the same (batch, heads, tokens); got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if total_tokens is None:
        if k.shape[2] == 0:
            raise ValueError("linear_attention_state needs at least one token (or total_tokens)")
    elif total_tokens < max(1, k.shape[2]):
        raise ValueError(
            f"total_tokens ({total_tokens}) must be positive and at least the keys' own {k.shape[2]} tokens"
        )


def _check_read_inputs(q: torch.Tensor, state: torch.Tensor, key_mean: torch.Tensor) -> None:
    if q.ndim != 4 or state.ndim != 4 or key_mean.ndim != 4:
        raise ValueError(
            f"linear_attention_from_state expects q (B, H, N, d), state (B, H, d, e), key_mean (B, H, 1, d); "
            f"got {tuple(q.shape)}, {tuple(state.shape)}, {tuple(key_mean.shape)}"
        )
    b, h, _, d = q.shape
    if state.shape[:3] != (b, h, d) or key_mean.shape != (b, h, 1, d):
        raise ValueError(
            f"state must be (B, H, d, e) = ({b}, {h}, {d}, e) and key_mean (B, H, 1, d) = ({b}, {h}, 1, {d}) "
            f"for q of shape {tuple(q.shape)}; got {tuple(state.shape)}, {tuple(key_mean.shape)}"
        )


def _split_backend(backend: str, lead: torch.Tensor, inputs: tuple[torch.Tensor, ...], name: str) -> str:
    """The concrete backend for one half of the op: :func:`select_backend` on ``lead``, with two exceptions
    for ``auto``, which takes ``reference``:

    * a gradient is wanted: only the reference is differentiable here (a forced other backend raises);
    * ``meta`` tensors (memory and FLOP traces): the engines' cost models count the reference's
      temporaries and matmuls, an upper bound of the kernels' (the chunked kernel computes nothing on meta).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown linear-attention backend {backend!r}; choose one of {BACKENDS}")
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    if lead.shape[2] == 0:  # nothing to stream over: the reference's empty sums and products are exact
        return "reference"
    if backend == "auto":
        return "reference" if wants_grad or lead.is_meta else select_backend(lead)
    if wants_grad and backend != "reference":
        raise ValueError(
            f"{name} with backend {backend!r} is not differentiable, and an input requires grad: run it "
            f"under torch.no_grad(), or use backend='reference' (or 'auto', which picks it) for gradients"
        )
    return backend


def linear_attention_state(
    k: torch.Tensor, v: torch.Tensor, total_tokens: int | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summary every query reads, ``(S, key_mean)``: the first half of :func:`linear_attention`.

    S = phi(K)^T V / N, shape (B, H, d, e), and key_mean = sum_j phi(k_j) / N, shape (B, H, 1, d), both in
    fp32 (fp64 for fp64 keys) whatever the input dtype. ``total_tokens`` is N: when k and v are one part
    of a longer sequence, pass the whole sequence's token count and the parts' results *sum* to the
    whole's (so one all-reduce, or a running sum over bands, gives the global state). Default: k's own
    token count. ``backend`` as in :func:`linear_attention` (``auto``: :func:`select_backend` on k, but
    ``reference`` on ``meta`` and when a gradient is wanted: only ``reference`` is differentiable here, and
    a forced other backend then raises ValueError).
    """
    _check_state_inputs(k, v, total_tokens)
    backend = _split_backend(backend, k, (k, v), "linear_attention_state")
    if backend == "chunked":
        return linear_attention_state_chunked(k, v, total_tokens)
    if backend == "triton":
        from .triton_backend import linear_attention_state_triton

        return linear_attention_state_triton(k, v, total_tokens)
    return linear_attention_state_reference(k, v, total_tokens)


def linear_attention_from_state(
    q: torch.Tensor,
    state: torch.Tensor,
    key_mean: torch.Tensor,
    eps: float = 1e-4,
    backend: str = "auto",
) -> torch.Tensor:
    """out_i = phi(q_i) S / (phi(q_i) . key_mean + eps): the second half of :func:`linear_attention`.

    q is (B, H, N, d) before the feature map; ``state`` and ``key_mean`` come from
    :func:`linear_attention_state` (fp32, or fp64 sums; ``triton`` reads them in fp32). Returns
    (B, H, N, e) in q's dtype, computed in fp32 (fp64 for fp64 q or state; chunked). ``backend`` and
    gradients as in :func:`linear_attention_state` (``auto`` decides on q).
    """
    _check_read_inputs(q, state, key_mean)
    backend = _split_backend(backend, q, (q, state, key_mean), "linear_attention_from_state")
    if backend == "chunked":
        return linear_attention_from_state_chunked(q, state, key_mean, eps)
    if backend == "triton":
        from .triton_backend import linear_attention_from_state_triton

        return linear_attention_from_state_triton(q, state, key_mean, eps)
    return linear_attention_from_state_reference(q, state, key_mean, eps).to(q.dtype)
