"""The schedule of one banded UNet call: its passes over row bands, the store they read and write, and
what they cost.

Every layer runs as one or more *passes*: a loop over the row bands of its output, each band's inputs
fetched from the store (the next band's fetch issued before the current band computes, so that copies
overlap compute) and its result written back. :class:`BandRun` runs those loops and keeps the accounts
(FLOPs banded and plain, passes, the device peak); a *dry* run (the cost model) walks the same schedule on
``meta`` and traces only one band of every pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...banding import BandStore, Moments, StoredActivation, Transfers
from ...tracing import traced_peak


def linear_flops(module: nn.Module, tokens: int) -> int:
    """FLOPs of every Linear inside ``module`` applied to ``tokens`` tokens (2 per multiply-add)."""
    return sum(
        2 * tokens * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)
    )


def conv_flops(conv: nn.Conv2d, batch: int, height: int, width: int) -> int:
    """FLOPs of ``conv`` producing a ``batch`` x ``height`` x ``width`` output (2 per multiply-add)."""
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    return 2 * batch * height * width * conv.out_channels * (conv.in_channels // conv.groups) * kernel


@dataclass
class Conditioning:
    """What every layer of one call reads besides the activations: the time embedding and the text."""

    emb: torch.Tensor
    context: torch.Tensor
    cross_attention: dict[str, Any]  # keyword arguments of every attn2 call


class BandRun:
    """One banded UNet call's passes over bands, its store and transfers, and their accounting.

    ``dry`` (the cost model) walks the same schedule on ``meta`` but traces only one band of every pass:
    its working bytes on top of what the store holds on the device give the device peak.
    """

    def __init__(self, unet: nn.Module, band_bytes: int, store: BandStore, dry: bool = False) -> None:
        self.unet = unet
        weight = unet.conv_in.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.band_bytes = band_bytes
        self.store = store
        self.transfers = Transfers(self.device, store)
        self.dry = dry
        self.flops = 0
        self.plain_flops = 0
        self.passes = 0
        self.working_peak = 0  # store bytes on the device plus one band's working bytes, at the highest
        self.context_tokens = 0
        self._dry_traces: dict[Any, tuple[int, int, int]] = {}

    # ------------------------------------------------------------------ bookkeeping
    def count(self, banded: int, plain: int | None = None) -> None:
        self.flops += banded
        self.plain_flops += banded if plain is None else plain

    def release(self, item: StoredActivation, keep: list[StoredActivation]) -> None:
        if not any(item is kept for kept in keep):
            self.store.release(item)

    def write(self, out: StoredActivation, start: int, stop: int, band: torch.Tensor) -> None:
        band = band.to(self.dtype)
        self.transfers.put(out, start, stop, band)
        if out.moments is not None:
            out.moments.add(band)

    def new(self, shape: tuple[int, int, int, int], parked: bool, tokens: bool = False) -> StoredActivation:
        stored = self.store.allocate(shape, self.dtype, parked=parked, tokens=tokens)
        if not tokens:
            stored.moments = Moments.empty(shape[0], shape[1], self.device)
        return stored

    def passes_over(
        self,
        bands: list[tuple[int, int]],
        fetch: Callable[[int, int], Any],
        body: Callable[[int, int, Any], None],
        alike: Any = None,
    ) -> None:
        """``body(start, stop, inputs)`` for every band, ``inputs`` from ``fetch(start, stop)``.

        With a separate store the next band's fetch is issued before the current band's body runs (on CUDA
        the copies then overlap the compute). Dry runs trace one full band instead, with a second fetch
        alive to stand for the one issued ahead; passes given the same ``alike`` key (a transformer's
        identical middle blocks) reuse the first one's trace.
        """
        self.passes += 1
        ahead = self.store.separate and len(bands) > 1
        if self.dry:
            if alike is None or alike not in self._dry_traces:
                trace = self._trace_band(bands, fetch, body, ahead)
                if alike is not None:
                    self._dry_traces[alike] = trace
            working, fetched, written = self._dry_traces.get(alike) or trace
            self.working_peak = max(self.working_peak, self.store.live["device"] + working)
            self.transfers.fetched += fetched * len(bands)
            self.transfers.written += written * len(bands)
            return
        if not ahead:
            for start, stop in bands:
                body(start, stop, self.transfers.ready(fetch(start, stop)))
            return
        upcoming = fetch(*bands[0])
        for index, (start, stop) in enumerate(bands):
            current = upcoming
            upcoming = fetch(*bands[index + 1]) if index + 1 < len(bands) else None
            body(start, stop, self.transfers.ready(current))

    def _trace_band(
        self,
        bands: list[tuple[int, int]],
        fetch: Callable[[int, int], Any],
        body: Callable[[int, int, Any], None],
        ahead: bool,
    ) -> tuple[int, int, int]:
        """Working bytes of one full band (an inner one: both halos), and its bytes fetched and written."""
        start, stop = max(bands, key=lambda band: (band[1] - band[0], band[0] > 0))
        fetched, written = self.transfers.fetched, self.transfers.written

        def one_band() -> None:
            inputs = self.transfers.ready(fetch(start, stop))
            issued_ahead = fetch(start, stop) if ahead else None  # noqa: F841 - alive during the body
            body(start, stop, inputs)

        working = traced_peak(one_band)
        band_fetched = (self.transfers.fetched - fetched) // (2 if ahead else 1)
        band_written = self.transfers.written - written
        self.transfers.fetched, self.transfers.written = fetched, written
        return working, band_fetched, band_written


__all__ = ["BandRun", "Conditioning", "conv_flops", "linear_flops"]
