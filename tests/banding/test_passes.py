"""Passes over bands: the order of fetches and bodies (one band ahead with a separate store), one band traced
on ``meta`` (its working bytes, copies and FLOPs) and the accounts multiplied by the bands."""

from __future__ import annotations

import torch

from linfusion.banding import BandPasses, BandStore, BandTrace

BANDS = [(0, 2), (2, 4), (4, 5)]


def events_of_a_pass(store_device: str | None) -> list[tuple[str, int]]:
    passes = BandPasses(BandStore(torch.device("cpu"), store_device))
    events: list[tuple[str, int]] = []

    def fetch(start: int, stop: int) -> int:
        events.append(("fetch", start))
        return start

    def body(start: int, stop: int, inputs: int) -> None:
        assert inputs == start  # each body gets its own band's fetch
        events.append(("body", start))

    passes.run_bands(BANDS, fetch, body)
    return events


def test_a_store_on_the_device_fetches_each_band_before_its_body() -> None:
    expected = [("fetch", 0), ("body", 0), ("fetch", 2), ("body", 2), ("fetch", 4), ("body", 4)]
    assert events_of_a_pass(None) == expected


def test_a_separate_store_fetches_one_band_ahead() -> None:
    expected = [("fetch", 0), ("fetch", 2), ("body", 0), ("fetch", 4), ("body", 2), ("body", 4)]
    assert events_of_a_pass("cpu") == expected
    passes = BandPasses(BandStore(torch.device("cpu"), "cpu"))
    assert passes.fetches_ahead(BANDS) and not passes.fetches_ahead([(0, 5)])


def test_a_traced_band_counts_its_working_bytes_copies_and_flops() -> None:
    """A band that fetches 4x8 parked float32 rows, multiplies them by an 8x16 matrix and writes the 4x16
    result back: 128 bytes fetched (twice when one more stays alive for the band ahead), 256 written."""
    store = BandStore(torch.device("meta"), "cpu")
    passes = BandPasses(store, dry=True)
    source = store.allocate((1, 1, 4, 8), torch.float32, parked=True)
    target = store.allocate((1, 1, 4, 16), torch.float32, parked=True)
    weight = torch.empty(8, 16, device="meta")

    def fetch(start: int, stop: int) -> torch.Tensor:
        return passes.transfers.fetch(source, start, stop)

    def body(start: int, stop: int, rows: torch.Tensor) -> None:
        passes.transfers.put(target, start, stop, rows @ weight)

    alone = passes.trace_band(fetch, body, 0, 4, ahead=False, count_flops=True)
    ahead = passes.trace_band(fetch, body, 0, 4, ahead=True)
    assert alone == BandTrace(working=128 + 256, fetched=128, written=256, flops=2 * 4 * 8 * 16)
    assert ahead == BandTrace(working=2 * 128 + 256, fetched=128, written=256, flops=0)
    assert (passes.transfers.fetched, passes.transfers.written) == (0, 0)  # tracing moved nothing

    passes.account(alone, bands=3)
    assert passes.flops == 3 * 2 * 4 * 8 * 16
    assert (passes.transfers.fetched, passes.transfers.written) == (3 * 128, 3 * 256)
    assert passes.working_peak == store.live["device"] + 128 + 256
