"""The plan: which points to store, pass by pass, for a store budget; and its cost, analytically.

The program is one pass per GroupNorm input, in order, then a last pass that writes the output. A pass
streams row chunks from a stored point (its *source*) to a *target* point and may *store* a point it
crosses; later passes start there instead of recomputing from further back. Storing everything
(``store_limit_bytes=None``) computes every layer once, the plain VAE's FLOPs, with about two activations
of the largest layer in the store; storing less recomputes more. :func:`plan_vae` picks, for a store
budget, the stored points that minimise the FLOPs (a dynamic programme over the passes), and
:func:`tiled_vae_cost` reports that plan's device and host peaks and FLOPs without running anything (the
memory planner calls it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .chain import SOFTMAX_KEY_CHUNKS, Chain, Point, attention_chunks, pass_rows, vae_units, working_bytes

DEFAULT_BAND_BYTES = 256 * 2**20
# The store allocates whole-row blocks of about this size and frees a block once all its rows were read.
# 32 MiB is glibc's largest dynamic mmap threshold: blocks this large are mapped and unmapped on their own,
# so freed ones go back to the system instead of fragmenting the heap (measured: with ~2 MiB chunks the
# CPU peak RSS sat 30 % above the live bytes).
DEFAULT_STORE_BLOCK_BYTES = 32 * 2**20


class StoreBudgetError(MemoryError):
    """No choice of stored points fits ``store_limit_bytes``; ``minimum`` is the smallest budget that does."""

    def __init__(self, budget: int, minimum: int):
        self.budget, self.minimum = budget, minimum
        super().__init__(
            f"the exact tiled VAE needs a store of at least {minimum / 2**30:.3f} GiB at this size "
            f"(store_limit_bytes is {budget / 2**30:.3f} GiB); raise store_limit_bytes or use a smaller size"
        )


@dataclass(frozen=True)
class Pass:
    """Stream ``source`` -> ``target`` in chunks of ``rows`` source rows, storing ``store`` on the way."""

    source: Point
    target: Point
    store: Point | None
    release: bool  # the source's last use: its rows are freed as they are read
    rows: int
    flops: int
    store_bytes: int  # the store's live bytes during the pass (the input included)
    working_bytes: int  # device memory of the chunks


@dataclass
class Plan:
    """The passes of one encode or decode, from :func:`plan_vae`."""

    chain: Chain
    passes: list[Pass]
    band_bytes: int
    block_bytes: int

    @property
    def flops(self) -> int:
        return sum(item.flops for item in self.passes)

    @property
    def store_peak(self) -> int:
        return max(item.store_bytes for item in self.passes)

    @property
    def working_peak(self) -> int:
        return max(item.working_bytes for item in self.passes)

    @property
    def stored(self) -> list[Point]:
        return [item.store for item in self.passes if item.store is not None]

    def peaks(self, device_store_bytes: int | None = 0) -> tuple[int, int]:
        """(device, host) peak bytes when up to ``device_store_bytes`` of the store stay on the compute
        device (None: all of it) and the rest is on the host; chunks fill the device part first."""
        share = math.inf if device_store_bytes is None else device_store_bytes
        device = max(item.working_bytes + min(item.store_bytes, share) for item in self.passes)
        host = max(max(0, item.store_bytes - share) for item in self.passes)
        return int(device), int(host)

    def moved_bytes(self, device_store_bytes: int | None = 0) -> int:
        """Bytes copied between the compute device and a store on the host, both directions summed.

        The input's copy into the store, every read of a stored point and every write of one (the output
        included), and softmax keys and values parked in the store (read once per query chunk). With
        ``device_store_bytes`` of the store on the device, a pass's reads and writes count in the share
        of its store that is on the host (an estimate: the tiler fills the device share first). None: the
        store is on the compute device and nothing moves.
        """
        if device_store_bytes is None:
            return 0
        chain = self.chain
        total = chain.tensor_bytes(Point(0))
        for item in self.passes:
            reads = chain.resume_bytes(item.source)
            parked = 0
            if chain.is_attention_output(item.target):
                reads *= 3  # keys and values, queries, the residual: each a read of the input
                chunks = attention_chunks(chain, item.source.unit, self.band_bytes)
                if chunks.kernel == SOFTMAX_KEY_CHUNKS:  # keys and values parked in the store
                    height = chain.cut_shapes[item.source.unit].height
                    parked = chunks.kv_bytes * (1 + -(-height // chunks.query_rows))
            writes = chain.tensor_bytes(item.target) if item.target == chain.output else 0
            if item.store is not None:
                keeps_input = item.store.inner and item.source == Point(item.store.unit)
                writes += chain.tensor_bytes(item.store) if keeps_input else chain.resume_bytes(item.store)
            on_host = max(0, item.store_bytes - device_store_bytes) / max(1, item.store_bytes)
            total += round((reads + writes) * on_host) + parked
        return int(total)


def _block_bytes(chain: Chain, point: Point, block_bytes: int) -> int:
    """One store block of the tensors a resume point needs: whole rows, about ``block_bytes`` each."""
    total = 0
    for part in (point, Point(point.unit)) if point.inner else (point,):
        row = chain.row_bytes(part)
        total += min(chain.tensor_bytes(part), -(-block_bytes // row) * row)
    return total


def _store_bytes(
    chain: Chain, source: Point, target: Point, store: Point | None, band_bytes: int, block_bytes: int
) -> int:
    """The store's live bytes during one pass (see :mod:`linfusion.tiled_vae` for what is freed when).

    A pass that supersedes its source frees the source's blocks as it reads them while it fills the new
    point's blocks, so at any moment it holds (1 - f) of one and f of the other, plus at most one
    partly read and one partly filled block.
    """
    held = chain.tensor_bytes(Point(0))  # the input, held by the caller throughout
    read = 0 if source == Point(0) else chain.resume_bytes(source)
    if target == chain.output:  # the output is allocated whole before the pass
        return held + read + chain.tensor_bytes(target)
    if store is None:
        return held + read
    written = chain.resume_bytes(store)
    keys_values = 0
    if chain.is_attention_output(target):
        keys_values = attention_chunks(chain, source.unit, band_bytes).stored_kv_bytes
    if source == Point(0) or (store.inner and source == Point(store.unit)):  # nothing is freed
        return held + max(read, written) + keys_values
    slack = _block_bytes(chain, source, block_bytes) + _block_bytes(chain, store, block_bytes)
    return held + min(read + written, max(read, written) + slack) + keys_values


def _search(chain: Chain, band_bytes: int, block_bytes: int, budget: float, peak_first: bool,
            allowed: set[Point] | None) -> list[tuple[Point, Point, Point | None]]:  # fmt: skip
    """Dynamic programme over the passes: after each target, the best way to have each point stored.

    Order: total FLOPs, then peak store bytes (``peak_first`` swaps them, to find the smallest budget).
    A pass stores at most one point (from ``allowed``, None: any), later than the previous target
    (storing it earlier is never worse). The attention's input and output are always stored.
    """
    Entry = tuple[int, int, tuple]  # (flops, peak, passes) or (peak, flops, passes)
    states: dict[Point, Entry] = {Point(0): (0, 0, ())}
    previous = Point(0)
    for target in chain.targets():
        following: dict[Point, Entry] = {}
        for source, (first, second, passes) in states.items():
            flops, peak = (second, first) if peak_first else (first, second)
            if chain.is_attention_output(target):  # the attention pass itself: stored input to stored output
                if source != Point(target.unit - 1):
                    continue
                choices: list[Point | None] = [target]
            elif chain.is_attention_input(target):
                choices = [target]
            elif target == chain.output:
                choices = [None]
            else:
                crossed = chain.between(max(source, previous), target)
                choices = [None, *(point for point in crossed if allowed is None or point in allowed)]
            for store in choices:
                live = _store_bytes(chain, source, target, store, band_bytes, block_bytes)
                if live > budget:
                    continue
                total, top = flops + chain.flops(source, target), max(peak, live)
                entry = ((top, total) if peak_first else (total, top)) + (
                    passes + ((source, target, store),),
                )
                resume = store or source
                if resume not in following or entry[:2] < following[resume][:2]:
                    following[resume] = entry
        states, previous = following, target
    if not states:
        return []
    return min(states.values(), key=lambda entry: entry[:2])[2]


STORE_POINTS = ("any", "level-inputs")


def plan_vae(
    chain: Chain,
    band_bytes: int = DEFAULT_BAND_BYTES,
    store_limit_bytes: int | None = None,
    store_points: str = "any",
    block_bytes: int = DEFAULT_STORE_BLOCK_BYTES,
) -> Plan:
    """The passes that minimise FLOPs with the store within ``store_limit_bytes`` bytes (None: no limit).

    ``store_points``: "any" point may be stored, or only the "level-inputs" (see :meth:`Chain.level_inputs`).
    ``block_bytes``: the store's allocation unit (see ``DEFAULT_STORE_BLOCK_BYTES``).
    """
    if store_points not in STORE_POINTS:
        raise ValueError(f"store_points must be one of {STORE_POINTS}; got {store_points!r}")
    allowed = chain.level_inputs() if store_points == "level-inputs" else None
    budget = math.inf if store_limit_bytes is None else store_limit_bytes
    chosen = _search(chain, band_bytes, block_bytes, budget, peak_first=False, allowed=allowed)
    if not chosen:
        smallest = _search(chain, band_bytes, block_bytes, math.inf, peak_first=True, allowed=allowed)
        minimum = max(_store_bytes(chain, *item, band_bytes, block_bytes) for item in smallest)
        raise StoreBudgetError(int(budget), minimum)
    passes = []
    for source, target, store in chosen:
        keeps_source = store is not None and store.inner and source == Point(store.unit)
        release = source != Point(0) and (target == chain.output or (store is not None and not keeps_source))
        if chain.is_attention_output(target):
            chunks = attention_chunks(chain, source.unit, band_bytes)
            rows, working = chunks.rows, chunks.working_bytes
        else:
            rows = pass_rows(chain, source, target, band_bytes)
            working = working_bytes(chain, source, target, rows)
        store_bytes = _store_bytes(chain, source, target, store, band_bytes, block_bytes)
        passes.append(
            Pass(source, target, store, release, rows, chain.flops(source, target), store_bytes, working)
        )
    return Plan(chain, passes, band_bytes, block_bytes)


@dataclass(frozen=True)
class VAECost:
    """What one tiled encode or decode costs, from the plan alone (weights excluded)."""

    device_peak: int  # chunks, plus the part of the store on the compute device
    host_peak: int  # the part of the store on the host
    store_peak: int
    working_peak: int
    flops: int
    plain_flops: int
    passes: int
    stored: tuple[Point, ...]
    moved_bytes: int = 0  # copied between the compute device and the host part of the store

    @property
    def overhead(self) -> float:
        """FLOPs of the tiled path over the plain VAE's."""
        return self.flops / self.plain_flops


def tiled_vae_cost(
    vae_config: Mapping[str, Any],
    width: int,
    height: int,
    *,
    dtype: torch.dtype = torch.float16,
    batch: int = 1,
    band_bytes: int = DEFAULT_BAND_BYTES,
    store_limit_bytes: int | None = None,
    encode: bool = False,
    device_store_bytes: int | None = 0,
    store_points: str = "any",
    attention: str = "exact",
    block_bytes: int = DEFAULT_STORE_BLOCK_BYTES,
) -> VAECost:
    """Peaks and FLOPs of the exact tiled VAE for a ``width`` x ``height`` image, in milliseconds.

    ``store_limit_bytes``: bytes the whole store may hold (None: no limit); ``device_store_bytes``: how much
    of it may stay on the compute device (None: all, as with ``store_device`` the VAE's device), the rest
    is on the host. ``attention``: "exact" (the VAE's softmax) or "linear"
    (:mod:`linfusion.vae_attention`). Raises :class:`StoreBudgetError` when no plan fits.
    """
    chain = _chain(vae_config, width, height, dtype, batch, encode, attention)
    plan = plan_vae(chain, band_bytes, store_limit_bytes, store_points, block_bytes)
    device_peak, host_peak = plan.peaks(device_store_bytes)
    return VAECost(
        device_peak=device_peak,
        host_peak=host_peak,
        store_peak=plan.store_peak,
        working_peak=plan.working_peak,
        flops=plan.flops,
        plain_flops=plan.chain.plain_flops,
        passes=len(plan.passes),
        stored=tuple(plan.stored),
        moved_bytes=plan.moved_bytes(device_store_bytes),
    )


def _chain(config: Mapping[str, Any], width: int, height: int, dtype: torch.dtype, batch: int, encode: bool,
           attention: str) -> Chain:  # fmt: skip
    if attention not in ("exact", "linear"):
        raise ValueError(f"attention must be 'exact' or 'linear'; got {attention!r}")
    factor = 2 ** (len(config.get("block_out_channels", (64,))) - 1)
    if not encode:
        height, width = height // factor, width // factor
    element_size = torch.empty((), dtype=dtype).element_size()
    return Chain(vae_units(config, encode), batch, height, width, element_size, attention)


__all__ = [
    "DEFAULT_BAND_BYTES",
    "DEFAULT_STORE_BLOCK_BYTES",
    "STORE_POINTS",
    "Pass",
    "Plan",
    "StoreBudgetError",
    "VAECost",
    "plan_vae",
    "tiled_vae_cost",
]
