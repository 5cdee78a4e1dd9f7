"""Chunked pure-PyTorch backend: the default on CPU and the fallback on every device.

The op is computed in two streaming passes over the sequence, so only a few chunk-sized scratch buffers
exist at any time (never a full fp32 copy of q, k or v, whatever the input dtype):

1. keys/values: ``A = [phi(K)^T V | phi(K)^T 1]`` is accumulated chunk by chunk into one fp32 (fp64 for
   fp64 inputs) ``(d, d + 1)`` matrix per head with ``baddbmm_``, then divided by N once. Its first d
   columns are S = phi(K)^T V / N, the last one is the key mean m.
2. queries: one matmul per chunk, ``phi(q) @ A``, yields the numerator and, in its last column, the
   normalizer z - eps; the division writes straight into the output.

The backward (a custom :class:`torch.autograd.Function`) recomputes phi and the per-chunk outputs from
q, k, v and the saved ``(d, d + 1)`` state instead of storing activations, again in two passes.

Feature map: ``phi(t) = exp(min(t, 0)) + max(t, 0)``, which equals ``elu(t) + 1`` but never rounds a small
positive value to exactly 0 (``expm1(t) + 1`` does so in fp32 below t ~ -17, and in bf16 far earlier).
It is always evaluated in the compute dtype (fp32 for fp16/bf16 inputs).
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

# Bytes of one chunk-sized fp32 scratch buffer on CPU. Measured on a 2-core AVX-512 machine: chunks of
# ~4 MiB (about 2,048 tokens for 8 heads of 40) amortise per-op dispatch while the chunk being worked on
# still mostly lives in cache; 1-8 MiB are within noise of each other.
CPU_CHUNK_BYTES = 4 << 20
# On accelerators the element-wise ops are bandwidth and launch-latency bound: use far larger chunks.
ACCEL_CHUNK_BYTES = 64 << 20
MIN_CHUNK = 16
# Upper bound on the forward's scratch, as a fraction of the size of q + k + v.
SCRATCH_FRACTION = 1 / 16
MAX_CHUNK = 1 << 20


# Outputs at least this large are allocated on transparent huge pages where the kernel offers them on
# request (Linux, THP mode "madvise"): a fresh 84 MB output otherwise costs ~20k page faults, which on the
# 2-core test VM took as long as the rest of the forward's memory traffic. LINFUSION_THP=0 disables it.
HUGEPAGE_MIN_BYTES = 32 << 20
_MADV_HUGEPAGE = 14
_madvise: Callable[..., int] | None | bool = None


def _hugepage_madvise() -> Callable[..., int] | None:
    """libc's madvise when huge pages are available only on request (THP mode "madvise"), else None."""
    global _madvise
    if _madvise is None:
        _madvise = False
        try:
            with open("/sys/kernel/mm/transparent_hugepage/enabled") as mode:
                on_request = "[madvise]" in mode.read()
            if on_request and sys.platform.startswith("linux") and os.environ.get("LINFUSION_THP") != "0":
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
        except (OSError, AttributeError):
            pass
    return _madvise or None


def new_output(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.empty_like`` (same layout), on huge pages for large CPU outputs where that is on request.

    Only advises the kernel about memory this call just allocated and has not touched yet; any failure
    leaves an ordinary tensor.
    """
    out = torch.empty_like(like, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if out.device.type == "cpu" and nbytes >= HUGEPAGE_MIN_BYTES:
        madvise = _hugepage_madvise()
        if madvise is not None:
            page = 4096
            start = (out.data_ptr() + page - 1) // page * page
            end = (out.data_ptr() + nbytes) // page * page
            if end > start:
                madvise(start, end - start, _MADV_HUGEPAGE)
    return out


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (gradcheck); everything else is computed and accumulated in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_size(
    batch_heads: int, tokens: int, head_dim: int, device: torch.device, input_itemsize: int = 4
) -> int:
    """Tokens per chunk: sized by cache (CPU) or launch overhead (GPU), then capped by memory.

    The forward keeps two chunk-sized scratch buffers of width ~d + 1 in the compute dtype. The cap keeps
    them under SCRATCH_FRACTION of q + k + v, so that with the output (a third of q + k + v) and the
    (d, d + 1) state per head the op's peak extra memory stays below half of q + k + v once the sequence
    is long enough for the state to be small (about 1,000 tokens for SD's head dims).
    """
    compute_itemsize = 8 if input_itemsize == 8 else 4
    budget = CPU_CHUNK_BYTES if device.type == "cpu" else ACCEL_CHUNK_BYTES
    per_token = max(1, batch_heads * (head_dim + 1) * compute_itemsize)
    chunk = 1 << max(0, int(math.log2(max(1, budget // per_token))))
    # 2 * chunk * (d + 1) * c_size <= SCRATCH_FRACTION * 3 * tokens * d * in_size
    memory_cap = int(
        SCRATCH_FRACTION * 3 * tokens * head_dim * input_itemsize / (2 * (head_dim + 1) * compute_itemsize)
    )
    return int(max(1, min(chunk, max(MIN_CHUNK, memory_cap), MAX_CHUNK, tokens)))


def feature_map_(x: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Write phi(x) = exp(min(x, 0)) + max(x, 0) into ``out`` (compute dtype); ``tmp`` is scratch.

    ``x`` may be any dtype and layout; reading it once from memory and working on the cache-resident
    chunk afterwards is what keeps this cheap.
    """
    if x.dtype != out.dtype:  # fp16/bf16 input: convert the chunk once, then work in place
        out.copy_(x)
        torch.clamp(out, min=0, out=tmp)
        out.clamp_(max=0)
    else:
        torch.clamp(x, max=0, out=out)
        torch.clamp(x, min=0, out=tmp)
    return out.exp_().add_(tmp)


def heads_view(x: torch.Tensor) -> torch.Tensor | None:
    """(B, H, n, d) -> (B*H, n, d) without copying when the strides allow it, else None."""
    b, h, n, d = x.shape
    if h == 1:
        batch_stride = x.stride(0)
    elif b == 1 or x.stride(0) == h * x.stride(1):
        batch_stride = x.stride(1)
    else:
        return None
    return x.as_strided((b * h, n, d), (batch_stride, x.stride(2), x.stride(3)))


def _as_batched(x: torch.Tensor, dtype: torch.dtype, scratch: torch.Tensor) -> torch.Tensor:
    """A (B*H, n, d) bmm operand from a (B, H, n, d) slice: a view when possible, else a copy in scratch."""
    if x.dtype == dtype:
        view = heads_view(x)
        if view is not None and view.stride(-1) == 1:
            return view
    scratch.view(x.shape).copy_(x)
    return scratch


class _Workspace:
    """Two chunk-sized scratch buffers (plus phi), allocated once per call and carved per chunk."""

    def __init__(
        self,
        b: int,
        h: int,
        chunk: int,
        width: int,
        d: int,
        dtype: torch.dtype,
        device: torch.device,
        extra: bool,
    ):
        self.b, self.h = b, h
        self.phi_buf = torch.empty(b * h * chunk * d, dtype=dtype, device=device)
        self.wide_buf = torch.empty(b * h * chunk * width, dtype=dtype, device=device)
        # The third buffer is only needed by the backward.
        self.extra_buf = torch.empty(b * h * chunk * width if extra else 0, dtype=dtype, device=device)

    def _carve(self, buf: torch.Tensor, n: int, width: int) -> torch.Tensor:
        bh = self.b * self.h
        return buf[: bh * n * width].view(bh, n, width)

    def phi(self, n: int, d: int) -> torch.Tensor:
        return self._carve(self.phi_buf, n, d)

    def wide(self, n: int, width: int) -> torch.Tensor:
        return self._carve(self.wide_buf, n, width)

    def extra(self, n: int, width: int) -> torch.Tensor:
        return self._carve(self.extra_buf, n, width)

    def four_d(self, t: torch.Tensor) -> torch.Tensor:
        """View a (B*H, n, w) tensor as (B, H, n, w)."""
        return t.view(self.b, self.h, t.shape[1], t.shape[2])


def _store(op: Callable[..., torch.Tensor], a: torch.Tensor, b: torch.Tensor, dest: torch.Tensor) -> None:
    """dest = op(a, b) where a is scratch in the compute dtype. Same dtype: written directly. Otherwise
    computed in place in a and copied (an ``out=`` of another dtype would allocate a hidden temporary)."""
    if dest.dtype == a.dtype:
        op(a, b, out=dest)
    else:
        dest.copy_(op(a, b, out=a))


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _phi_chunk(ws: _Workspace, x: torch.Tensor) -> torch.Tensor:
    """phi of a (B, H, n, d) input slice into the workspace, as a contiguous (B*H, n, d) tensor."""
    n, d = x.shape[2], x.shape[3]
    phi = ws.phi(n, d)
    feature_map_(x, ws.four_d(phi), ws.four_d(ws.wide(n, d)))  # "wide" is free at this point
    return phi


def _workspace_for(
    q: torch.Tensor, v: torch.Tensor, chunk: int, dtype: torch.dtype, backward: bool = False
) -> _Workspace:
    b, h, _, d = q.shape
    e = v.shape[-1]
    return _Workspace(b, h, chunk, max(d, e + 1), d, dtype, q.device, extra=backward)


def _resolve_chunk(q: torch.Tensor, chunk: int | None) -> int:
    b, h, n, d = q.shape
    if chunk is None:
        chunk = default_chunk_size(b * h, n, d, q.device, q.element_size())
    return max(1, min(int(chunk), n))


def chunked_state(
    k: torch.Tensor, v: torch.Tensor, chunk: int, ws: _Workspace, total_tokens: int | None = None
) -> torch.Tensor:
    """State A = [S | m], (B*H, d, e + 1) in the workspace dtype, accumulated over chunks of keys.

    Divided by ``total_tokens`` (default: k's token count), so parts of one sequence sum to the whole.
    """
    b, h, n, d = k.shape
    e = v.shape[-1]
    dtype = ws.phi_buf.dtype
    state = torch.zeros(b * h, d, e + 1, dtype=dtype, device=k.device)
    if k.is_meta:  # nothing is computed on meta (memory planning): the loop only carves the workspace
        return state
    s_part, m_part = state[..., :e], state[..., e:]
    for start, end in _chunks(n, chunk):
        phi = _phi_chunk(ws, k[:, :, start:end])
        vc = _as_batched(v[:, :, start:end], dtype, ws.wide(end - start, e))
        s_part.baddbmm_(phi.transpose(1, 2), vc)
        m_part.add_(phi.sum(dim=1).unsqueeze(-1))
    return state.div_(n if total_tokens is None else total_tokens)


def chunked_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (input dtype; q's layout when shapes allow) and the (B*H, d, e + 1) state for backward."""
    e = v.shape[-1]
    dtype = compute_dtype_for(q.dtype)
    chunk = _resolve_chunk(q, chunk)
    ws = _workspace_for(q, v, chunk, dtype)
    state = chunked_state(k, v, chunk, ws)
    out = new_output(q) if e == q.shape[-1] else new_output(v, dtype=q.dtype)
    return chunked_read(q, state, eps, chunk, ws, out), state


def chunked_read(
    q: torch.Tensor, state: torch.Tensor, eps: float, chunk: int, ws: _Workspace, out: torch.Tensor
) -> torch.Tensor:
    """out_i = phi(q_i) S / (phi(q_i) . m + eps) for A = [S | m] (B*H, d, e + 1), chunk by chunk into out."""
    e = state.shape[-1] - 1
    for start, end in [] if q.is_meta else _chunks(q.shape[2], chunk):  # meta: allocations only
        phi = _phi_chunk(ws, q[:, :, start:end])
        wide = torch.bmm(phi, state, out=ws.wide(end - start, e + 1))
        z = wide[..., e:].add_(eps)
        _store(torch.div, ws.four_d(wide[..., :e]), ws.four_d(z), out[:, :, start:end])
    return out


def chunked_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    eps: float,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv by recomputation in two passes with chunk-sized scratch only.

    With u = phi(q) A (width e + 1), z = u_e + eps, o = u_{:e} / z, w = g / z and c = w . o:
    dphi(q) = [w | -c] A^T and dA = sum_i phi(q_i)^T [w_i | -c_i]; then with dA / N = [dS | dm]:
    dphi(k) = v dS^T + dm^T, dv = phi(k) dS; finally phi'(t) = min(phi(t), 1).
    """
    n, d = q.shape[2], q.shape[3]
    e = v.shape[-1]
    dtype = state.dtype
    chunk = _resolve_chunk(q, chunk)
    ws = _workspace_for(q, v, chunk, dtype, backward=True)
    d_state = torch.zeros_like(state)
    dq = new_output(q)
    state_t = state.transpose(1, 2)
    for start, end in _chunks(n, chunk):
        m = end - start
        phi = _phi_chunk(ws, q[:, :, start:end])
        wide = torch.bmm(phi, state, out=ws.wide(m, e + 1))
        z = wide[..., e:].add_(eps)
        out_c = wide[..., :e].div_(z)
        w_aug = ws.extra(m, e + 1)  # [g / z | -(g / z) . o]
        torch.div(grad[:, :, start:end], ws.four_d(z), out=ws.four_d(w_aug[..., :e]))
        out_c.mul_(w_aug[..., :e])
        torch.sum(out_c, dim=-1, keepdim=True, out=w_aug[..., e:])
        w_aug[..., e:].neg_()
        d_state.baddbmm_(phi.transpose(1, 2), w_aug)
        dphi = torch.bmm(w_aug, state_t, out=ws.wide(m, d))
        phi.clamp_(max=1)
        _store(torch.mul, ws.four_d(dphi), ws.four_d(phi), dq[:, :, start:end])
    d_state.div_(n)
    ds, dm = d_state[..., :e], d_state[..., e:].transpose(1, 2)  # (BH, d, e), (BH, 1, d)
    ds_t = ds.transpose(1, 2)
    dk = new_output(k)
    dv = new_output(v)
    dv_direct = heads_view(dv) if dv.dtype == dtype else None
    for start, end in _chunks(n, chunk):
        m = end - start
        phi = _phi_chunk(ws, k[:, :, start:end])
        if dv_direct is not None and dv_direct.stride(-1) == 1:
            torch.bmm(phi, ds, out=dv_direct[:, start:end])
        else:
            dv[:, :, start:end].copy_(ws.four_d(torch.bmm(phi, ds, out=ws.wide(m, e))))
        vc = _as_batched(v[:, :, start:end], dtype, ws.extra(m, e))
        dphi = torch.baddbmm(dm, vc, ds_t, out=ws.wide(m, d))
        phi.clamp_(max=1)
        _store(torch.mul, ws.four_d(dphi), ws.four_d(phi), dk[:, :, start:end])
    return dq, dk, dv


class ChunkedLinearAttention(torch.autograd.Function):
    """Autograd wrapper: saves only q, k, v and the small (d, d + 1) state, recomputes the rest."""

    @staticmethod
    def forward(ctx, q, k, v, eps, chunk):  # type: ignore[override]
        out, state = chunked_forward(q, k, v, eps, chunk)
        ctx.save_for_backward(q, k, v, state)
        ctx.eps, ctx.chunk = eps, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        q, k, v, state = ctx.saved_tensors
        dq, dk, dv = chunked_backward(grad, q, k, v, state, ctx.eps, ctx.chunk)
        return dq, dk, dv, None, None


def linear_attention_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-4, chunk: int | None = None
) -> torch.Tensor:
    """Chunked normalized linear attention on (B, H, N, d) tensors (before phi); differentiable."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return ChunkedLinearAttention.apply(q, k, v, eps, chunk)
    return chunked_forward(q, k, v, eps, chunk)[0]


def split_state(joined: torch.Tensor, batch: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [S | m], (B*H, d, e + 1) -> contiguous ``(S, key_mean)``, (B, H, d, e) and (B, H, 1, d)."""
    d, e = joined.shape[1], joined.shape[2] - 1
    summed = joined[..., :e].reshape(batch, heads, d, e).contiguous()
    return summed, joined[..., e:].reshape(batch, heads, 1, d).contiguous()


def join_state(state: torch.Tensor, key_mean: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(S, key_mean)`` -> A = [S | m], (B*H, d, e + 1) in ``dtype``: the layout the read kernels take."""
    b, h, d, e = state.shape
    return torch.cat([state.reshape(b * h, d, e).to(dtype), key_mean.reshape(b * h, d, 1).to(dtype)], dim=-1)


def linear_attention_state_chunked(
    k: torch.Tensor, v: torch.Tensor, total_tokens: int | None = None, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, key_mean)`` of (B, H, N, d) keys and values, streamed over token chunks (not differentiable).

    Same semantics as :func:`linfusion.ops.reference.linear_attention_state_reference`: fp32 (fp64 for
    fp64 inputs), shapes (B, H, d, e) and (B, H, 1, d), divided by ``total_tokens`` when given. Half
    precision inputs are converted one chunk at a time, never as a whole.
    """
    b, h, _, d = k.shape
    e = v.shape[-1]
    dtype = compute_dtype_for(k.dtype)
    chunk = _resolve_chunk(k, chunk)
    ws = _Workspace(b, h, chunk, max(d, e), d, dtype, k.device, extra=False)
    return split_state(chunked_state(k, v, chunk, ws, total_tokens), b, h)


def linear_attention_from_state_chunked(
    q: torch.Tensor,
    state: torch.Tensor,
    key_mean: torch.Tensor,
    eps: float = 1e-4,
    chunk: int | None = None,
) -> torch.Tensor:
    """phi(q) S / (phi(q) . key_mean + eps) for (B, H, N, d) queries, in q's dtype (not differentiable).

    Computed in fp32 (fp64 when q or the state is fp64), a chunk of queries at a time, into one output
    allocated up front in q's dtype (and q's layout when the value head dim equals d).
    """
    b, h, n, d = q.shape
    e = state.shape[-1]
    dtype = torch.promote_types(compute_dtype_for(q.dtype), compute_dtype_for(state.dtype))
    chunk = _resolve_chunk(q, chunk)
    ws = _Workspace(b, h, chunk, max(d, e + 1), d, dtype, q.device, extra=False)
    out = new_output(q) if e == d else torch.empty((b, h, n, e), dtype=q.dtype, device=q.device)
    return chunked_read(q, join_state(state, key_mean, dtype), eps, chunk, ws, out)
