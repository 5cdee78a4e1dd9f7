"""The passes of one banded call over its bands, and the accounts every banding engine keeps of them.

A *pass* runs a body over every band of a layer's output, each band's inputs fetched from the store; with a
separate store the next band's fetch is issued before the current band's body runs, so that on CUDA the copy
overlaps the compute (:meth:`BandPasses.run_bands`). A *dry* call (a cost model, on ``meta``) runs no pass
but traces one band of it (:meth:`BandPasses.trace_band`) and multiplies what that band cost by the bands
(:meth:`BandPasses.account`). Which band to trace, and how often, is the engine's own choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ..tracing import traced_flops, traced_peak
from .store import BandStore, Transfers

Fetch = Callable[[int, int], Any]
Body = Callable[[int, int, Any], None]


class BandTrace(NamedTuple):
    """What one band of a pass cost, traced on ``meta``."""

    working: int  # bytes alive at once while it ran, on top of the store
    fetched: int  # bytes it copied from the store device
    written: int  # bytes it copied back
    flops: int  # its FLOPs as torch's flop counter sees them (0 when not counted)


class BandPasses:
    """One banded call's store, band copies and accounts: FLOPs, passes, the device peak, bytes moved.

    ``dry``: the call runs on ``meta`` for a cost model; its engine traces bands instead of running passes.
    """

    def __init__(self, store: BandStore, dry: bool = False) -> None:
        self.store = store
        self.transfers = Transfers(store.device, store)
        self.dry = dry
        self.flops = 0
        self.passes = 0
        self.working_peak = 0  # store bytes on the device plus one band's working bytes, at the highest

    def fetches_ahead(self, bands: list[tuple[int, int]]) -> bool:
        """Whether a pass over ``bands`` fetches one band ahead (a separate store and several bands)."""
        return self.store.separate and len(bands) > 1

    def run_bands(self, bands: list[tuple[int, int]], fetch: Fetch, body: Body) -> None:
        """``body(start, stop, inputs)`` for every band, ``inputs`` from ``fetch(start, stop)``, each fetch
        issued one band ahead where :meth:`fetches_ahead`."""
        if not self.fetches_ahead(bands):
            for start, stop in bands:
                body(start, stop, self.transfers.ready(fetch(start, stop)))
            return
        upcoming = fetch(*bands[0])
        for index, (start, stop) in enumerate(bands):
            current = upcoming
            upcoming = fetch(*bands[index + 1]) if index + 1 < len(bands) else None
            body(start, stop, self.transfers.ready(current))

    def trace_band(
        self, fetch: Fetch, body: Body, start: int, stop: int, ahead: bool, count_flops: bool = False
    ) -> BandTrace:
        """What band ``[start, stop)`` of a pass costs, traced on ``meta``; the transfer counts are left as
        they were. ``ahead``: a second fetch stays alive during the body, standing for the one issued ahead.
        ``count_flops``: run the body once more under the flop counter (the math path of attention)."""
        before = (self.transfers.fetched, self.transfers.written)

        def one_band() -> None:
            inputs = self.transfers.ready(fetch(start, stop))
            issued_ahead = fetch(start, stop) if ahead else None  # noqa: F841 - alive during the body
            body(start, stop, inputs)

        working = traced_peak(one_band)  # fused attention: the memory of a real kernel
        fetched = (self.transfers.fetched - before[0]) // (2 if ahead else 1)
        written = self.transfers.written - before[1]
        flops = 0
        if count_flops:
            flops = traced_flops(lambda: body(start, stop, self.transfers.ready(fetch(start, stop))))
        self.transfers.fetched, self.transfers.written = before
        return BandTrace(working, fetched, written, flops)

    def account(self, trace: BandTrace, bands: int) -> None:
        """Add ``bands`` bands that cost ``trace`` each (on top of what the store holds on the device now)."""
        self.working_peak = max(self.working_peak, self.store.live["device"] + trace.working)
        self.flops += trace.flops * bands
        self.transfers.fetched += trace.fetched * bands
        self.transfers.written += trace.written * bands


__all__ = ["BandPasses", "BandTrace", "Body", "Fetch"]
