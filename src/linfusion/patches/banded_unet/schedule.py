"""The schedule of one banded UNet call: its passes over row bands, the store they read and write, and
what they cost.

Every layer runs as one or more *passes*: a loop over the row bands of its output, each band's inputs
fetched from the store (the next band's fetch issued before the current band computes, so that copies
overlap compute) and its result written back. :class:`BandRun` runs those loops and keeps the accounts
(FLOPs banded and plain, passes, the device peak); a *dry* run (the cost model) walks the same schedule on
``meta`` and traces only one band of every pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...banding import BandPasses, BandStore, BandTrace, Body, Fetch, Moments, StoredActivation


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


class BandRun(BandPasses):
    """One banded UNet call's passes over bands, its store and transfers, and their accounting.

    ``dry`` (the cost model) walks the same schedule on ``meta`` but traces only one band of every pass:
    its working bytes on top of what the store holds on the device give the device peak.
    """

    def __init__(self, unet: nn.Module, band_bytes: int, store: BandStore, dry: bool = False) -> None:
        super().__init__(store, dry)
        self.unet = unet
        weight = unet.conv_in.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.band_bytes = band_bytes
        self.plain_flops = 0
        self.context_tokens = 0
        self._dry_traces: dict[Any, BandTrace] = {}

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

    def passes_over(self, bands: list[tuple[int, int]], fetch: Fetch, body: Body, alike: Any = None) -> None:
        """``body(start, stop, inputs)`` for every band, ``inputs`` from ``fetch(start, stop)``.

        With a separate store the next band's fetch is issued before the current band's body runs (on CUDA
        the copies then overlap the compute). Dry runs trace one full band instead (an inner one: both
        halos), with a second fetch alive to stand for the one issued ahead; passes given the same ``alike``
        key (a transformer's identical middle blocks) reuse the first one's trace.
        """
        self.passes += 1
        if not self.dry:
            self.run_bands(bands, fetch, body)
            return
        trace = self._dry_traces.get(alike) if alike is not None else None
        if trace is None:
            start, stop = max(bands, key=lambda band: (band[1] - band[0], band[0] > 0))
            trace = self.trace_band(fetch, body, start, stop, ahead=self.fetches_ahead(bands))
            if alike is not None:
                self._dry_traces[alike] = trace
        self.account(trace, len(bands))


__all__ = ["BandRun", "Conditioning", "conv_flops", "linear_flops"]
