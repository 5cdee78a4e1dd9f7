"""The benchmark's inputs and timed calls: q, k, v, each backend's call, and the floors it is compared with."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ...ops import linear_attention
from ...ops.chunked import new_output


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_qkv(
    batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(3):
        t = torch.randn(batch, heads, tokens, head_dim, generator=generator, dtype=torch.float32)
        out.append(t.to(device=device, dtype=dtype))
    return out[0], out[1], out[2]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (fp64 arithmetic on the maxima)."""
    diff = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    return float(diff / scale) if scale > 0 else float(diff)


def attention_op(backend: str, eps: float = 1e-4) -> Callable[..., torch.Tensor]:
    if backend == "sdpa":
        return F.scaled_dot_product_attention
    return lambda q, k, v: linear_attention(q, k, v, eps=eps, backend=backend)


def time_calls(
    fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device, warm_fn: Callable[[], Any] | None
) -> list[float]:
    for _ in range(warmup):
        (warm_fn or fn)()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def case_callable(
    backend: str, mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> Callable[[], Any]:
    op = attention_op(backend)
    if mode == "forward":

        def forward() -> Any:
            with torch.no_grad():
                return op(q, k, v)

        return forward
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    grad = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)

    def forward_backward() -> None:
        op(*leaves).backward(grad)
        for t in leaves:  # inside the call, so that every call (and memory probe) starts without grads
            t.grad = None

    return forward_backward


def floor_callable(mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fresh: bool) -> Callable:
    """Minimal-traffic stand-ins: read q, k, v once and write one output (plus the backward's traffic).

    ``fresh`` allocates the outputs per call exactly as the op does (:func:`new_output`), so page-fault
    costs are on both sides; otherwise they are preallocated (the strict floor: pure traffic).
    """
    alloc = new_output if fresh else None
    out = torch.empty_like(q)
    grad = torch.randn_like(q)
    grads = [torch.empty_like(t) for t in (q, k, v)]

    def forward() -> None:
        torch.addcmul(q, k, v, out=alloc(q) if alloc else out)

    def forward_backward() -> None:
        forward()
        dq, dk, dv = (alloc(t) for t in (q, k, v)) if alloc else grads
        torch.add(q, grad, out=dq)
        dk.copy_(k)
        dv.copy_(v)

    return forward if mode == "forward" else forward_backward


def arithmetic_callable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable:
    """The unavoidable arithmetic of the chunked forward with torch's kernels, without anything else:
    exp over q and k, phi(K)^T V and phi(Q) [S | m] as chunked GEMMs on cache-resident operands.
    Reported next to the memory-traffic floor because on a few CPU cores this op is compute bound."""
    from ...ops.chunked import default_chunk_size, heads_view

    b, h, n, d = q.shape
    e = v.shape[-1]
    chunk = default_chunk_size(b * h, n, d, q.device, q.element_size())
    q3, k3, v3 = (heads_view(t) for t in (q, k, v))
    if q3 is None or k3 is None or v3 is None or q.dtype != torch.float32:
        return lambda: None
    buf = torch.empty(b * h, chunk, d)
    state = torch.zeros(b * h, d, e + 1)
    wide = torch.empty(b * h, chunk, e + 1)

    def run() -> None:
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            phi = buf[:, : end - start]
            torch.exp(k3[:, start:end], out=phi)
            state[..., :e].baddbmm_(phi.transpose(1, 2), v3[:, start:end])
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            phi = buf[:, : end - start]
            torch.exp(q3[:, start:end], out=phi)
            torch.bmm(phi, state, out=wide[:, : end - start])

    return run
