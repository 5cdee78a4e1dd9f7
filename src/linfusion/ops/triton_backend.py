"""Triton backend (GPU): fused forward and backward kernels for normalized non-causal linear attention.

Import-guarded: importing this module never fails; :data:`AVAILABLE` says whether triton is importable.
The kernels also run under triton's interpreter (``TRITON_INTERPRET=1`` set before this module is first
imported), which is how they are tested on machines without a GPU.

Forward (two launches plus a tiny reduction):

* ``_state_kernel`` -- grid (B*H, splits, tiles of the (d, e) state): each program streams its slice of
  the sequence once, applies phi to k in registers, accumulates ``phi(k)^T v`` and ``sum phi(k)`` in fp32
  and writes one partial ``[S | sum]`` tile. The partials are summed over the splits (a deterministic
  split-sequence reduction) and divided by N in fp32; S is never downcast.
* ``_output_kernel`` -- grid (B*H, token blocks, tiles of e): ``phi(q) @ S`` with the normalizer
  ``phi(q) . m + eps`` and the division fused in the epilogue, stored in the input dtype.

Backward (four launches plus a tiny reduction), recomputing phi instead of storing activations; the only
O(N) scratch is two fp32 scalars per token and head (z and c below), never an O(N d) buffer.

Head dims of any size are handled by tiling d and e into blocks of ``BLOCK_D`` (masked at the edges), so
SD's 40, 64, 80 and 160 all work.
"""

from __future__ import annotations

import os

import torch

from .chunked import join_state, split_state

try:  # pragma: no cover - exercised only where triton is installed
    import triton
    import triton.language as tl

    AVAILABLE = True
except Exception:  # noqa: BLE001 - any import failure (missing, broken driver) means "not available"
    triton = None
    tl = None
    AVAILABLE = False


def interpreted() -> bool:
    """True when triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports(q: torch.Tensor) -> bool:
    """Whether this backend can run on q's device: CUDA with triton, or any device when interpreted."""
    if not AVAILABLE:
        return False
    return q.is_cuda or interpreted()


if AVAILABLE:

    @triton.jit
    def _phi(x):
        # elu(x) + 1 without expm1 cancellation: exp(min(x, 0)) never rounds a small positive value to 0
        # before fp32 underflow, and the min() keeps the unused branch finite.
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))

    @triton.jit
    def _state_kernel(
        k_ptr, v_ptr, part_ptr,
        H, N, D, E, tokens_per_split,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        spb, sps, spr, spc,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, N_E_TILES: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        pid_split = tl.program_id(1)
        pid_tile = tl.program_id(2)
        tile_d = pid_tile // N_E_TILES
        tile_e = pid_tile % N_E_TILES
        b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B*H*N*d passes 2^31 at a few M tokens
        h = (pid_bh % H).to(tl.int64)
        offs_d = tile_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_e = tile_e * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask_e = offs_e < E
        start = pid_split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, N)
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        ksum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        for n0 in range(start, end, BLOCK_N):
            offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            mask_n = offs_n < end
            kt = tl.load(
                k_base + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=mask_n[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            phi = tl.where(mask_n[:, None] & mask_d[None, :], _phi(kt), 0.0)
            vt = tl.load(
                v_base + offs_n[:, None] * svn + offs_e[None, :] * svd,
                mask=mask_n[:, None] & mask_e[None, :],
                other=0.0,
            ).to(tl.float32)
            acc = tl.dot(tl.trans(phi), vt, acc, input_precision=DOT_PREC)
            ksum += tl.sum(phi, axis=0)
        p_base = part_ptr + pid_bh * spb + pid_split * sps
        tl.store(
            p_base + offs_d[:, None] * spr + offs_e[None, :] * spc,
            acc,
            mask=mask_d[:, None] & mask_e[None, :],
        )
        if tile_e == 0:
            tl.store(p_base + offs_d * spr + E * spc, ksum, mask=mask_d)

    @triton.jit
    def _output_kernel(
        q_ptr, st_ptr, o_ptr,
        H, N, D, E, eps,
        sqb, sqh, sqn, sqd,
        ssb, ssr, ssc,
        sob, soh, son, sod,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        tile_e = tl.program_id(2)
        b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B*H*N*d passes 2^31 at a few M tokens
        h = (pid_bh % H).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < N
        offs_e = tile_e * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_e = offs_e < E
        q_base = q_ptr + b * sqb + h * sqh
        s_base = st_ptr + pid_bh * ssb
        num = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        z = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            qt = tl.load(
                q_base + offs_n[:, None] * sqn + offs_d[None, :] * sqd,
                mask=mask_n[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            phi = tl.where(mask_d[None, :], _phi(qt), 0.0)
            st = tl.load(
                s_base + offs_d[:, None] * ssr + offs_e[None, :] * ssc,
                mask=mask_d[:, None] & mask_e[None, :],
                other=0.0,
            )
            mean = tl.load(s_base + offs_d * ssr + E * ssc, mask=mask_d, other=0.0)
            num = tl.dot(phi, st, num, input_precision=DOT_PREC)
            z += tl.sum(phi * mean[None, :], axis=1)
        out = num / (z + eps)[:, None]
        o_base = o_ptr + b * sob + h * soh
        tl.store(
            o_base + offs_n[:, None] * son + offs_e[None, :] * sod,
            out.to(o_ptr.dtype.element_ty),
            mask=mask_n[:, None] & mask_e[None, :],
        )

    @triton.jit
    def _bwd_rowstats_kernel(
        q_ptr, g_ptr, st_ptr, z_ptr, c_ptr,
        H, N, D, E, eps,
        sqb, sqh, sqn, sqd,
        sgb, sgh, sgn, sgd,
        ssb, ssr, ssc,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        # z_i = phi(q_i) . m + eps and c_i = sum_e g_ie * u_ie / z_i^2 (u = phi(q) S), per token.
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B*H*N*d passes 2^31 at a few M tokens
        h = (pid_bh % H).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < N
        q_base = q_ptr + b * sqb + h * sqh
        g_base = g_ptr + b * sgb + h * sgh
        s_base = st_ptr + pid_bh * ssb
        z = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            qt = tl.load(
                q_base + offs_n[:, None] * sqn + offs_d[None, :] * sqd,
                mask=mask_n[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            phi = tl.where(mask_d[None, :], _phi(qt), 0.0)
            mean = tl.load(s_base + offs_d * ssr + E * ssc, mask=mask_d, other=0.0)
            z += tl.sum(phi * mean[None, :], axis=1)
        z += eps
        gu = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_D):
            offs_e = e0 + tl.arange(0, BLOCK_D)
            mask_e = offs_e < E
            num = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                qt = tl.load(
                    q_base + offs_n[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0,
                ).to(tl.float32)
                phi = tl.where(mask_d[None, :], _phi(qt), 0.0)
                st = tl.load(
                    s_base + offs_d[:, None] * ssr + offs_e[None, :] * ssc,
                    mask=mask_d[:, None] & mask_e[None, :],
                    other=0.0,
                )
                num = tl.dot(phi, st, num, input_precision=DOT_PREC)
            gt = tl.load(
                g_base + offs_n[:, None] * sgn + offs_e[None, :] * sgd,
                mask=mask_n[:, None] & mask_e[None, :],
                other=0.0,
            ).to(tl.float32)
            gu += tl.sum(gt * num, axis=1)
        row = pid_bh * N + offs_n
        tl.store(z_ptr + row, z, mask=mask_n)
        tl.store(c_ptr + row, gu / (z * z), mask=mask_n)

    @triton.jit
    def _bwd_dq_kernel(
        q_ptr, g_ptr, st_ptr, z_ptr, c_ptr, dq_ptr,
        H, N, D, E,
        sqb, sqh, sqn, sqd,
        sgb, sgh, sgn, sgd,
        ssb, ssr, ssc,
        sdb, sdh, sdn, sdd,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        # dq = (sum_e (g / z) S^T - c m) * phi'(q), phi'(t) = min(phi(t), 1); one d-tile per program.
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        tile_d = tl.program_id(2)
        b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B*H*N*d passes 2^31 at a few M tokens
        h = (pid_bh % H).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < N
        offs_d = tile_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g_base = g_ptr + b * sgb + h * sgh
        s_base = st_ptr + pid_bh * ssb
        row = pid_bh * N + offs_n
        z = tl.load(z_ptr + row, mask=mask_n, other=1.0)
        c = tl.load(c_ptr + row, mask=mask_n, other=0.0)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_D):
            offs_e = e0 + tl.arange(0, BLOCK_D)
            mask_e = offs_e < E
            gt = tl.load(
                g_base + offs_n[:, None] * sgn + offs_e[None, :] * sgd,
                mask=mask_n[:, None] & mask_e[None, :],
                other=0.0,
            ).to(tl.float32)
            w = gt / z[:, None]
            st_t = tl.load(
                s_base + offs_d[None, :] * ssr + offs_e[:, None] * ssc,
                mask=mask_d[None, :] & mask_e[:, None],
                other=0.0,
            )  # (BLOCK_E, BLOCK_D) = S[d-tile, e-tile]^T
            acc = tl.dot(w, st_t, acc, input_precision=DOT_PREC)
        mean = tl.load(s_base + offs_d * ssr + E * ssc, mask=mask_d, other=0.0)
        acc -= c[:, None] * mean[None, :]
        qt = tl.load(
            q_ptr + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd,
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        dq = acc * tl.minimum(_phi(qt), 1.0)
        tl.store(
            dq_ptr + b * sdb + h * sdh + offs_n[:, None] * sdn + offs_d[None, :] * sdd,
            dq.to(dq_ptr.dtype.element_ty),
            mask=mask_n[:, None] & mask_d[None, :],
        )

    @triton.jit
    def _bwd_dstate_kernel(
        q_ptr, g_ptr, z_ptr, c_ptr, part_ptr,
        H, N, D, E, tokens_per_split,
        sqb, sqh, sqn, sqd,
        sgb, sgh, sgn, sgd,
        spb, sps, spr, spc,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, N_E_TILES: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        # Partial dA = sum_i phi(q_i)^T [g_i / z_i | -c_i] over this program's slice of the sequence.
        pid_bh = tl.program_id(0)
        pid_split = tl.program_id(1)
        pid_tile = tl.program_id(2)
        tile_d = pid_tile // N_E_TILES
        tile_e = pid_tile % N_E_TILES
        b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B*H*N*d passes 2^31 at a few M tokens
        h = (pid_bh % H).to(tl.int64)
        offs_d = tile_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_e = tile_e * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask_e = offs_e < E
        start = pid_split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, N)
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        dm = tl.zeros((BLOCK_D,), dtype=tl.float32)
        q_base = q_ptr + b * sqb + h * sqh
        g_base = g_ptr + b * sgb + h * sgh
        for n0 in range(start, end, BLOCK_N):
            offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            mask_n = offs_n < end
            qt = tl.load(
                q_base + offs_n[:, None] * sqn + offs_d[None, :] * sqd,
                mask=mask_n[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            phi = tl.where(mask_n[:, None] & mask_d[None, :], _phi(qt), 0.0)
            row = pid_bh * N + offs_n
            z = tl.load(z_ptr + row, mask=mask_n, other=1.0)
            c = tl.load(c_ptr + row, mask=mask_n, other=0.0)
            gt = tl.load(
                g_base + offs_n[:, None] * sgn + offs_e[None, :] * sgd,
                mask=mask_n[:, None] & mask_e[None, :],
                other=0.0,
            ).to(tl.float32)
            acc = tl.dot(tl.trans(phi), gt / z[:, None], acc, input_precision=DOT_PREC)
            dm -= tl.sum(phi * c[:, None], axis=0)
        p_base = part_ptr + pid_bh * spb + pid_split * sps
        tl.store(
            p_base + offs_d[:, None] * spr + offs_e[None, :] * spc,
            acc,
            mask=mask_d[:, None] & mask_e[None, :],
        )
        if tile_e == 0:
            tl.store(p_base + offs_d * spr + E * spc, dm, mask=mask_d)

    @triton.jit
    def _bwd_dk_kernel(
        k_ptr, v_ptr, dst_ptr, dk_ptr,
        H, N, D, E,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        ssb, ssr, ssc,
        sdb, sdh, sdn, sdd,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        # dk = (v dS^T + dm) * phi'(k), with [dS | dm] = dA / N; one d-tile per program.
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        tile_d = tl.program_id(2)
        b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B*H*N*d passes 2^31 at a few M tokens
        h = (pid_bh % H).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < N
        offs_d = tile_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        s_base = dst_ptr + pid_bh * ssb
        v_base = v_ptr + b * svb + h * svh
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_D):
            offs_e = e0 + tl.arange(0, BLOCK_D)
            mask_e = offs_e < E
            vt = tl.load(
                v_base + offs_n[:, None] * svn + offs_e[None, :] * svd,
                mask=mask_n[:, None] & mask_e[None, :],
                other=0.0,
            ).to(tl.float32)
            ds_t = tl.load(
                s_base + offs_d[None, :] * ssr + offs_e[:, None] * ssc,
                mask=mask_d[None, :] & mask_e[:, None],
                other=0.0,
            )
            acc = tl.dot(vt, ds_t, acc, input_precision=DOT_PREC)
        dm = tl.load(s_base + offs_d * ssr + E * ssc, mask=mask_d, other=0.0)
        acc += dm[None, :]
        kt = tl.load(
            k_ptr + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        dk = acc * tl.minimum(_phi(kt), 1.0)
        tl.store(
            dk_ptr + b * sdb + h * sdh + offs_n[:, None] * sdn + offs_d[None, :] * sdd,
            dk.to(dk_ptr.dtype.element_ty),
            mask=mask_n[:, None] & mask_d[None, :],
        )

    @triton.jit
    def _bwd_dv_kernel(
        k_ptr, dst_ptr, dv_ptr,
        H, N, D, E,
        skb, skh, skn, skd,
        ssb, ssr, ssc,
        sdb, sdh, sdn, sdd,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        # dv = phi(k) dS; one e-tile per program.
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        tile_e = tl.program_id(2)
        b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B*H*N*d passes 2^31 at a few M tokens
        h = (pid_bh % H).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < N
        offs_e = tile_e * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_e = offs_e < E
        k_base = k_ptr + b * skb + h * skh
        s_base = dst_ptr + pid_bh * ssb
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            kt = tl.load(
                k_base + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=mask_n[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            phi = tl.where(mask_d[None, :], _phi(kt), 0.0)
            ds = tl.load(
                s_base + offs_d[:, None] * ssr + offs_e[None, :] * ssc,
                mask=mask_d[:, None] & mask_e[None, :],
                other=0.0,
            )
            acc = tl.dot(phi, ds, acc, input_precision=DOT_PREC)
        tl.store(
            dv_ptr + b * sdb + h * sdh + offs_n[:, None] * sdn + offs_e[None, :] * sdd,
            acc.to(dv_ptr.dtype.element_ty),
            mask=mask_n[:, None] & mask_e[None, :],
        )


# Launch parameters. BLOCK_D tiles the head dims (64 covers SD's 40 and 64 in one tile, 80 in two and 160
# in three); they are conservative choices, not tuned on a GPU (none was available when this was written).
BLOCK_N = 64
BLOCK_D_MAX = 64
TARGET_PROGRAMS = 1024


def _block_d(d: int, e: int) -> int:
    return max(16, min(BLOCK_D_MAX, triton.next_power_of_2(max(d, e))))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products (matches the reference to ~1e-6). fp16/bf16 inputs: tf32 products,
    whose 10-bit mantissa matches the inputs' own precision while keeping fp32's range (phi never
    underflows as it would in fp16); accumulation is fp32 either way."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _splits(bh: int, tiles: int, n: int) -> tuple[int, int]:
    """Split the sequence so that the state reduction launches about TARGET_PROGRAMS programs."""
    max_splits = triton.cdiv(n, BLOCK_N)
    splits = max(1, min(max_splits, triton.cdiv(TARGET_PROGRAMS, max(1, bh * tiles))))
    per_split = triton.cdiv(triton.cdiv(n, splits), BLOCK_N) * BLOCK_N
    return triton.cdiv(n, per_split), per_split


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def triton_state(k: torch.Tensor, v: torch.Tensor, total_tokens: int | None = None) -> torch.Tensor:
    """[S | m] as (B*H, d, e + 1) fp32: phi(k)^T v / N and the key mean (N: total_tokens if given)."""
    b, h, n, d = k.shape
    e = v.shape[-1]
    block_d = _block_d(d, e)
    n_d, n_e = triton.cdiv(d, block_d), triton.cdiv(e, block_d)
    splits, per_split = _splits(b * h, n_d * n_e, n)
    part = torch.empty(b * h, splits, d, e + 1, dtype=torch.float32, device=k.device)
    _state_kernel[(b * h, splits, n_d * n_e)](
        k, v, part, h, n, d, e, per_split,
        *_strides4(k), *_strides4(v), *_strides4(part),
        BLOCK_N=BLOCK_N, BLOCK_D=block_d, N_E_TILES=n_e, DOT_PREC=_dot_precision(k.dtype),
    )  # fmt: skip
    return part.sum(dim=1).div_(n if total_tokens is None else total_tokens)


def triton_read(q: torch.Tensor, state: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """out = phi(q) S / (phi(q) . m + eps) for the fp32 state A = [S | m], (B*H, d, e + 1)."""
    b, h, n, d = q.shape
    e = state.shape[-1] - 1
    block_d = _block_d(d, e)
    grid = (b * h, triton.cdiv(n, BLOCK_N), triton.cdiv(e, block_d))
    _output_kernel[grid](
        q, state, out, h, n, d, e, float(eps),
        *_strides4(q), state.stride(0), state.stride(1), state.stride(2), *_strides4(out),
        BLOCK_N=BLOCK_N, BLOCK_D=block_d, DOT_PREC=_dot_precision(q.dtype),
    )  # fmt: skip
    return out


def triton_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output in q's dtype and the fp32 state for the backward."""
    b, h, n, _ = q.shape
    state = triton_state(k, v)
    out = torch.empty((b, h, n, v.shape[-1]), dtype=q.dtype, device=q.device)
    return triton_read(q, state, eps, out), state


def triton_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (input dtypes) by recomputation; see chunked_backward for the algebra."""
    b, h, n, d = q.shape
    e = v.shape[-1]
    block_d = _block_d(d, e)
    n_d, n_e = triton.cdiv(d, block_d), triton.cdiv(e, block_d)
    prec = _dot_precision(q.dtype)
    n_blocks = triton.cdiv(n, BLOCK_N)
    s_strides = (state.stride(0), state.stride(1), state.stride(2))
    z = torch.empty(b * h, n, dtype=torch.float32, device=q.device)
    c = torch.empty_like(z)
    _bwd_rowstats_kernel[(b * h, n_blocks)](
        q, grad, state, z, c, h, n, d, e, float(eps),
        *_strides4(q), *_strides4(grad), *s_strides,
        BLOCK_N=BLOCK_N, BLOCK_D=block_d, DOT_PREC=prec,
    )  # fmt: skip
    dq = torch.empty_like(q)
    _bwd_dq_kernel[(b * h, n_blocks, n_d)](
        q, grad, state, z, c, dq, h, n, d, e,
        *_strides4(q), *_strides4(grad), *s_strides, *_strides4(dq),
        BLOCK_N=BLOCK_N, BLOCK_D=block_d, DOT_PREC=prec,
    )  # fmt: skip
    splits, per_split = _splits(b * h, n_d * n_e, n)
    part = torch.empty(b * h, splits, d, e + 1, dtype=torch.float32, device=q.device)
    _bwd_dstate_kernel[(b * h, splits, n_d * n_e)](
        q, grad, z, c, part, h, n, d, e, per_split,
        *_strides4(q), *_strides4(grad), *_strides4(part),
        BLOCK_N=BLOCK_N, BLOCK_D=block_d, N_E_TILES=n_e, DOT_PREC=prec,
    )  # fmt: skip
    d_state = part.sum(dim=1).div_(n)
    del part, z, c
    ds_strides = (d_state.stride(0), d_state.stride(1), d_state.stride(2))
    dk = torch.empty_like(k)
    _bwd_dk_kernel[(b * h, n_blocks, n_d)](
        k, v, d_state, dk, h, n, d, e,
        *_strides4(k), *_strides4(v), *ds_strides, *_strides4(dk),
        BLOCK_N=BLOCK_N, BLOCK_D=block_d, DOT_PREC=prec,
    )  # fmt: skip
    dv = torch.empty_like(v)
    _bwd_dv_kernel[(b * h, n_blocks, n_e)](
        k, d_state, dv, h, n, d, e,
        *_strides4(k), *ds_strides, *_strides4(dv),
        BLOCK_N=BLOCK_N, BLOCK_D=block_d, DOT_PREC=prec,
    )  # fmt: skip
    return dq, dk, dv


class TritonLinearAttention(torch.autograd.Function):
    """Autograd wrapper around the fused kernels; saves q, k, v and the small fp32 state only."""

    @staticmethod
    def forward(ctx, q, k, v, eps):  # type: ignore[override]
        out, state = triton_forward(q, k, v, eps)
        ctx.save_for_backward(q, k, v, state)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, k, v, state = ctx.saved_tensors
        dq, dk, dv = triton_backward(grad, q, k, v, state, ctx.eps)
        return dq, dk, dv, None


def _require_usable(x: torch.Tensor) -> None:
    """Raise why the kernels cannot run on x (triton missing, a device other than CUDA, fp64)."""
    if not AVAILABLE:
        raise RuntimeError("the triton backend needs the 'triton' package (pip install 'linfusion[triton]')")
    if not supports(x):
        raise RuntimeError(
            "the triton backend runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1 for testing); "
            f"got a tensor on {x.device}"
        )
    if x.dtype == torch.float64:
        raise TypeError("the triton backend supports fp32, fp16 and bf16; use backend='chunked' for fp64")


def linear_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-4
) -> torch.Tensor:
    """Fused triton linear attention on (B, H, N, d) tensors (before phi); differentiable."""
    _require_usable(q)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return TritonLinearAttention.apply(q, k, v, eps)
    return triton_forward(q, k, v, eps)[0]


def linear_attention_state_triton(
    k: torch.Tensor, v: torch.Tensor, total_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, key_mean)`` in fp32, (B, H, d, e) and (B, H, 1, d), by the state kernel (not differentiable).

    Semantics of :func:`linfusion.ops.reference.linear_attention_state_reference`, ``total_tokens`` included.
    """
    _require_usable(k)
    return split_state(triton_state(k, v, total_tokens), k.shape[0], k.shape[1])


def linear_attention_from_state_triton(
    q: torch.Tensor, state: torch.Tensor, key_mean: torch.Tensor, eps: float = 1e-4
) -> torch.Tensor:
    """phi(q) S / (phi(q) . key_mean + eps) by the output kernel, in q's dtype (not differentiable).

    The kernel reads the state in fp32: an fp64 state (e.g. summed over many parts) is rounded once.
    """
    _require_usable(q)
    b, h, n, _ = q.shape
    out = torch.empty((b, h, n, state.shape[-1]), dtype=q.dtype, device=q.device)
    return triton_read(q, join_state(state, key_mean, torch.float32), eps, out)
