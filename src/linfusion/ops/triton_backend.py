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

    # Building blocks shared by the kernels below. Triton inlines @triton.jit calls, so they cost nothing
    # at run time and each kernel computes exactly what it would with them written out.

    @triton.jit
    def _program_head(H):
        # This program's index on the B*H grid axis and its (b, h), in int64: B*H*N*d passes 2^31 at a
        # few M tokens.
        pid_bh = tl.program_id(0)
        return pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)

    @triton.jit
    def _span(start, BLOCK: tl.constexpr, limit):
        # Offsets of one block of a head dim and which of them lie inside it.
        offs = start + tl.arange(0, BLOCK)
        return offs, offs < limit

    @triton.jit
    def _token_span(start, BLOCK: tl.constexpr, limit):
        # Offsets of one block of tokens (int64: they multiply the sequence stride) and which are < limit.
        offs = (start + tl.arange(0, BLOCK)).to(tl.int64)
        return offs, offs < limit

    @triton.jit
    def _token_program(H, N, BLOCK_N: tl.constexpr):
        # Prologue of the kernels on the grid (B*H, token blocks, ...): head, (b, h) and the token block.
        pid_bh, b, h = _program_head(H)
        offs_n, mask_n = _token_span(tl.program_id(1) * BLOCK_N, BLOCK_N, N)
        return pid_bh, b, h, offs_n, mask_n

    @triton.jit
    def _split_program(H, N, D, E, tokens_per_split, BLOCK_D: tl.constexpr, N_E_TILES: tl.constexpr):
        # Prologue of the split-sequence kernels on the grid (B*H, splits, d-tiles * e-tiles): head,
        # (b, h), the program's (d, e) tile of the state and its slice [start, end) of the sequence.
        pid_bh, b, h = _program_head(H)
        pid_split = tl.program_id(1)
        pid_tile = tl.program_id(2)
        tile_d = pid_tile // N_E_TILES
        tile_e = pid_tile % N_E_TILES
        offs_d, mask_d = _span(tile_d * BLOCK_D, BLOCK_D, D)
        offs_e, mask_e = _span(tile_e * BLOCK_D, BLOCK_D, E)
        start = pid_split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, N)
        return pid_bh, b, h, offs_d, mask_d, offs_e, mask_e, tile_e, start, end

    @triton.jit
    def _load_tile(base, rows, cols, row_stride, col_stride, row_mask, col_mask):
        # A (rows, cols) tile, zero outside the masks, in the stored dtype.
        return tl.load(
            base + rows[:, None] * row_stride + cols[None, :] * col_stride,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )

    @triton.jit
    def _store_tile(base, rows, cols, row_stride, col_stride, row_mask, col_mask, value):
        # Store a (rows, cols) tile inside the masks, cast to the destination's dtype.
        tl.store(
            base + rows[:, None] * row_stride + cols[None, :] * col_stride,
            value.to(base.dtype.element_ty),
            mask=row_mask[:, None] & col_mask[None, :],
        )

    @triton.jit
    def _phi_tile(
        base, rows, cols, row_stride, col_stride, row_mask, col_mask, ZERO_MASKED_ROWS: tl.constexpr
    ):
        # phi of a (tokens, head dim) tile in fp32, zero in the padding columns. The state kernels sum over
        # tokens and also need the padding rows zeroed (phi(0) = 1); elsewhere those rows are never stored.
        x = _load_tile(base, rows, cols, row_stride, col_stride, row_mask, col_mask).to(tl.float32)
        keep = col_mask[None, :]
        if ZERO_MASKED_ROWS:
            keep = row_mask[:, None] & col_mask[None, :]
        return tl.where(keep, _phi(x), 0.0)

    @triton.jit
    def _load_column(s_base, offs_d, mask_d, ssr, ssc, E):
        # Rows offs_d of the last column of an fp32 [S | m] state: the key mean m (or its gradient).
        return tl.load(s_base + offs_d * ssr + E * ssc, mask=mask_d, other=0.0)

    @triton.jit
    def _load_row_stats(z_ptr, c_ptr, pid_bh, N, offs_n, mask_n):
        # The backward's per-token scalars z and c of one head (z = 1 at padding tokens: never 0 / 0).
        row = pid_bh * N + offs_n
        return tl.load(z_ptr + row, mask=mask_n, other=1.0), tl.load(c_ptr + row, mask=mask_n, other=0.0)

    @triton.jit
    def _store_partial(
        part_ptr, pid_bh, spb, sps, spr, spc, E, offs_d, mask_d, offs_e, mask_e, tile_e, tile, column
    ):
        # This split's partial [tile | column] of a (d, e + 1) state; the column once per d-tile (e-tile 0).
        p_base = part_ptr + pid_bh * spb + tl.program_id(1) * sps
        _store_tile(p_base, offs_d, offs_e, spr, spc, mask_d, mask_e, tile)
        if tile_e == 0:
            tl.store(p_base + offs_d * spr + E * spc, column, mask=mask_d)

    @triton.jit
    def _store_through_phi(grad_phi, x_base, sxn, sxd, dx_base, sdn, sdd, offs_n, offs_d, mask_n, mask_d):
        # dx = grad_phi * phi'(x) with phi'(t) = min(phi(t), 1), stored in dx's dtype.
        xt = _load_tile(x_base, offs_n, offs_d, sxn, sxd, mask_n, mask_d).to(tl.float32)
        _store_tile(dx_base, offs_n, offs_d, sdn, sdd, mask_n, mask_d, grad_phi * tl.minimum(_phi(xt), 1.0))

    @triton.jit
    def _phi_times_state(
        x_base, sxn, sxd, offs_n, mask_n, s_base, ssr, ssc, offs_e, mask_e, D,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        # phi(x) S[:, e-tile] for a block of tokens, accumulated in fp32 over the d-tiles.
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d, mask_d = _span(d0, BLOCK_D, D)
            phi = _phi_tile(x_base, offs_n, offs_d, sxn, sxd, mask_n, mask_d, False)
            st = _load_tile(s_base, offs_d, offs_e, ssr, ssc, mask_d, mask_e)
            acc = tl.dot(phi, st, acc, input_precision=DOT_PREC)
        return acc

    @triton.jit
    def _state_kernel(
        k_ptr, v_ptr, part_ptr,
        H, N, D, E, tokens_per_split,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        spb, sps, spr, spc,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, N_E_TILES: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        pid_bh, b, h, offs_d, mask_d, offs_e, mask_e, tile_e, start, end = _split_program(
            H, N, D, E, tokens_per_split, BLOCK_D, N_E_TILES
        )
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        ksum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        for n0 in range(start, end, BLOCK_N):
            offs_n, mask_n = _token_span(n0, BLOCK_N, end)
            phi = _phi_tile(k_base, offs_n, offs_d, skn, skd, mask_n, mask_d, True)
            vt = _load_tile(v_base, offs_n, offs_e, svn, svd, mask_n, mask_e).to(tl.float32)
            acc = tl.dot(tl.trans(phi), vt, acc, input_precision=DOT_PREC)
            ksum += tl.sum(phi, axis=0)
        _store_partial(
            part_ptr, pid_bh, spb, sps, spr, spc, E, offs_d, mask_d, offs_e, mask_e, tile_e, acc, ksum
        )

    @triton.jit
    def _output_kernel(
        q_ptr, st_ptr, o_ptr,
        H, N, D, E, eps,
        sqb, sqh, sqn, sqd,
        ssb, ssr, ssc,
        sob, soh, son, sod,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        pid_bh, b, h, offs_n, mask_n = _token_program(H, N, BLOCK_N)
        offs_e, mask_e = _span(tl.program_id(2) * BLOCK_D, BLOCK_D, E)
        q_base = q_ptr + b * sqb + h * sqh
        s_base = st_ptr + pid_bh * ssb
        num = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        z = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d, mask_d = _span(d0, BLOCK_D, D)
            phi = _phi_tile(q_base, offs_n, offs_d, sqn, sqd, mask_n, mask_d, False)
            st = _load_tile(s_base, offs_d, offs_e, ssr, ssc, mask_d, mask_e)
            mean = _load_column(s_base, offs_d, mask_d, ssr, ssc, E)
            num = tl.dot(phi, st, num, input_precision=DOT_PREC)
            z += tl.sum(phi * mean[None, :], axis=1)
        out = num / (z + eps)[:, None]
        _store_tile(o_ptr + b * sob + h * soh, offs_n, offs_e, son, sod, mask_n, mask_e, out)

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
        pid_bh, b, h, offs_n, mask_n = _token_program(H, N, BLOCK_N)
        q_base = q_ptr + b * sqb + h * sqh
        g_base = g_ptr + b * sgb + h * sgh
        s_base = st_ptr + pid_bh * ssb
        z = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d, mask_d = _span(d0, BLOCK_D, D)
            phi = _phi_tile(q_base, offs_n, offs_d, sqn, sqd, mask_n, mask_d, False)
            mean = _load_column(s_base, offs_d, mask_d, ssr, ssc, E)
            z += tl.sum(phi * mean[None, :], axis=1)
        z += eps
        gu = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_D):
            offs_e, mask_e = _span(e0, BLOCK_D, E)
            num = _phi_times_state(
                q_base, sqn, sqd, offs_n, mask_n, s_base, ssr, ssc, offs_e, mask_e, D,
                BLOCK_N, BLOCK_D, DOT_PREC,
            )  # fmt: skip
            gt = _load_tile(g_base, offs_n, offs_e, sgn, sgd, mask_n, mask_e).to(tl.float32)
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
        # dq = (sum_e (g / z) S^T - c m) * phi'(q); one d-tile per program.
        pid_bh, b, h, offs_n, mask_n = _token_program(H, N, BLOCK_N)
        offs_d, mask_d = _span(tl.program_id(2) * BLOCK_D, BLOCK_D, D)
        g_base = g_ptr + b * sgb + h * sgh
        s_base = st_ptr + pid_bh * ssb
        z, c = _load_row_stats(z_ptr, c_ptr, pid_bh, N, offs_n, mask_n)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_D):
            offs_e, mask_e = _span(e0, BLOCK_D, E)
            gt = _load_tile(g_base, offs_n, offs_e, sgn, sgd, mask_n, mask_e).to(tl.float32)
            w = gt / z[:, None]
            st_t = _load_tile(s_base, offs_e, offs_d, ssc, ssr, mask_e, mask_d)  # S[d-tile, e-tile]^T
            acc = tl.dot(w, st_t, acc, input_precision=DOT_PREC)
        mean = _load_column(s_base, offs_d, mask_d, ssr, ssc, E)
        acc -= c[:, None] * mean[None, :]
        q_base = q_ptr + b * sqb + h * sqh
        dq_base = dq_ptr + b * sdb + h * sdh
        _store_through_phi(acc, q_base, sqn, sqd, dq_base, sdn, sdd, offs_n, offs_d, mask_n, mask_d)

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
        pid_bh, b, h, offs_d, mask_d, offs_e, mask_e, tile_e, start, end = _split_program(
            H, N, D, E, tokens_per_split, BLOCK_D, N_E_TILES
        )
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        dm = tl.zeros((BLOCK_D,), dtype=tl.float32)
        q_base = q_ptr + b * sqb + h * sqh
        g_base = g_ptr + b * sgb + h * sgh
        for n0 in range(start, end, BLOCK_N):
            offs_n, mask_n = _token_span(n0, BLOCK_N, end)
            phi = _phi_tile(q_base, offs_n, offs_d, sqn, sqd, mask_n, mask_d, True)
            z, c = _load_row_stats(z_ptr, c_ptr, pid_bh, N, offs_n, mask_n)
            gt = _load_tile(g_base, offs_n, offs_e, sgn, sgd, mask_n, mask_e).to(tl.float32)
            acc = tl.dot(tl.trans(phi), gt / z[:, None], acc, input_precision=DOT_PREC)
            dm -= tl.sum(phi * c[:, None], axis=0)
        _store_partial(
            part_ptr, pid_bh, spb, sps, spr, spc, E, offs_d, mask_d, offs_e, mask_e, tile_e, acc, dm
        )

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
        pid_bh, b, h, offs_n, mask_n = _token_program(H, N, BLOCK_N)
        offs_d, mask_d = _span(tl.program_id(2) * BLOCK_D, BLOCK_D, D)
        s_base = dst_ptr + pid_bh * ssb
        v_base = v_ptr + b * svb + h * svh
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_D):
            offs_e, mask_e = _span(e0, BLOCK_D, E)
            vt = _load_tile(v_base, offs_n, offs_e, svn, svd, mask_n, mask_e).to(tl.float32)
            ds_t = _load_tile(s_base, offs_e, offs_d, ssc, ssr, mask_e, mask_d)  # dS[d-tile, e-tile]^T
            acc = tl.dot(vt, ds_t, acc, input_precision=DOT_PREC)
        dm = _load_column(s_base, offs_d, mask_d, ssr, ssc, E)
        acc += dm[None, :]
        k_base = k_ptr + b * skb + h * skh
        dk_base = dk_ptr + b * sdb + h * sdh
        _store_through_phi(acc, k_base, skn, skd, dk_base, sdn, sdd, offs_n, offs_d, mask_n, mask_d)

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
        pid_bh, b, h, offs_n, mask_n = _token_program(H, N, BLOCK_N)
        offs_e, mask_e = _span(tl.program_id(2) * BLOCK_D, BLOCK_D, E)
        k_base = k_ptr + b * skb + h * skh
        s_base = dst_ptr + pid_bh * ssb
        acc = _phi_times_state(
            k_base, skn, skd, offs_n, mask_n, s_base, ssr, ssc, offs_e, mask_e, D, BLOCK_N, BLOCK_D, DOT_PREC
        )
        _store_tile(dv_ptr + b * sdb + h * sdh, offs_n, offs_e, sdn, sdd, mask_n, mask_e, acc)


# Launch parameters. BLOCK_D tiles the head dims (64 covers SD's 40 and 64 in one tile, 80 in two and 160
# in three); they are conservative choices, not tuned on a GPU (none was available when this was written).
BLOCK_N = 64
BLOCK_D_MAX = 64
TARGET_PROGRAMS = 1024


def _head_tiles(d: int, e: int) -> tuple[int, int, int]:
    """BLOCK_D for head dims d and e, and how many BLOCK_D tiles each takes."""
    block_d = max(16, min(BLOCK_D_MAX, triton.next_power_of_2(max(d, e))))
    return block_d, triton.cdiv(d, block_d), triton.cdiv(e, block_d)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products (matches the reference to ~1e-6). fp16/bf16 inputs: tf32 products,
    whose 10-bit mantissa matches the inputs' own precision while keeping fp32's range (phi never
    underflows as it would in fp16); accumulation is fp32 either way."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _constants(block_d: int, dtype: torch.dtype) -> dict[str, int | str]:
    """The compile-time constants every kernel takes; the dot precision follows the inputs' dtype."""
    return {"BLOCK_N": BLOCK_N, "BLOCK_D": block_d, "DOT_PREC": _dot_precision(dtype)}


def _splits(bh: int, tiles: int, n: int) -> tuple[int, int]:
    """Split the sequence so that the state reduction launches about TARGET_PROGRAMS programs."""
    max_splits = triton.cdiv(n, BLOCK_N)
    splits = max(1, min(max_splits, triton.cdiv(TARGET_PROGRAMS, max(1, bh * tiles))))
    per_split = triton.cdiv(triton.cdiv(n, splits), BLOCK_N) * BLOCK_N
    return triton.cdiv(n, per_split), per_split


def _strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """Every stride of each tensor in turn, as the kernels take them."""
    return tuple(stride for t in tensors for stride in t.stride())


def _sum_over_splits(kernel, x: torch.Tensor, y: torch.Tensor, *per_token: torch.Tensor) -> torch.Tensor:
    """Run a split-sequence kernel over x (B, H, N, d) and y (B, H, N, e), grid (B*H, splits, d-tiles *
    e-tiles), and sum its fp32 partial (d, e + 1) states over the splits (deterministic)."""
    b, h, n, d = x.shape
    e = y.shape[-1]
    block_d, n_d, n_e = _head_tiles(d, e)
    splits, per_split = _splits(b * h, n_d * n_e, n)
    part = torch.empty(b * h, splits, d, e + 1, dtype=torch.float32, device=x.device)
    kernel[(b * h, splits, n_d * n_e)](
        x, y, *per_token, part, h, n, d, e, per_split, *_strides(x, y, part),
        N_E_TILES=n_e, **_constants(block_d, x.dtype),
    )  # fmt: skip
    return part.sum(dim=1)


def triton_state(k: torch.Tensor, v: torch.Tensor, total_tokens: int | None = None) -> torch.Tensor:
    """[S | m] as (B*H, d, e + 1) fp32: phi(k)^T v / N and the key mean (N: total_tokens if given)."""
    n = k.shape[2]
    return _sum_over_splits(_state_kernel, k, v).div_(n if total_tokens is None else total_tokens)


def triton_read(q: torch.Tensor, state: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """out = phi(q) S / (phi(q) . m + eps) for the fp32 state A = [S | m], (B*H, d, e + 1)."""
    b, h, n, d = q.shape
    e = state.shape[-1] - 1
    block_d, _, n_e = _head_tiles(d, e)
    _output_kernel[(b * h, triton.cdiv(n, BLOCK_N), n_e)](
        q, state, out, h, n, d, e, float(eps), *_strides(q, state, out), **_constants(block_d, q.dtype)
    )
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
    block_d, n_d, n_e = _head_tiles(d, e)
    constants = _constants(block_d, q.dtype)
    token_blocks = (b * h, triton.cdiv(n, BLOCK_N))
    z = torch.empty(b * h, n, dtype=torch.float32, device=q.device)
    c = torch.empty_like(z)
    _bwd_rowstats_kernel[token_blocks](
        q, grad, state, z, c, h, n, d, e, float(eps), *_strides(q, grad, state), **constants
    )
    dq = torch.empty_like(q)
    _bwd_dq_kernel[(*token_blocks, n_d)](
        q, grad, state, z, c, dq, h, n, d, e, *_strides(q, grad, state, dq), **constants
    )
    d_state = _sum_over_splits(_bwd_dstate_kernel, q, grad, z, c).div_(n)
    del z, c
    dk = torch.empty_like(k)
    _bwd_dk_kernel[(*token_blocks, n_d)](
        k, v, d_state, dk, h, n, d, e, *_strides(k, v, d_state, dk), **constants
    )
    dv = torch.empty_like(v)
    _bwd_dv_kernel[(*token_blocks, n_e)](k, d_state, dv, h, n, d, e, *_strides(k, d_state, dv), **constants)
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
