"""The row store: exact round trips on both sides, its device share, per-side byte peaks, the host arena."""

from __future__ import annotations

import pytest
import torch

from linfusion.banding import BandStore, HostArena, RowBlocks, StoredActivation, Transfers

CPU = torch.device("cpu")
SHAPE = (2, 3, 11, 5)  # logical (batch, channels, rows, width)
NBYTES = 2 * 3 * 11 * 5 * 4  # float32


def write_and_read(
    store: BandStore, stored: StoredActivation, x: torch.Tensor, bands: list[tuple[int, int]]
) -> torch.Tensor:
    """Write ``x`` band by band into ``stored``, read it back band by band (other bands than written)."""
    transfers = Transfers(CPU, store)
    for start, stop in bands:
        transfers.put(stored, start, stop, x[:, :, start:stop])
    parts = [
        transfers.ready(transfers.fetch(stored, start, stop)) for start, stop in ((0, 4), (4, 5), (5, 11))
    ]
    transfers.finish()
    return torch.cat(parts, dim=2)


def test_device_tier_round_trip() -> None:
    store = BandStore(CPU)
    x = torch.randn(SHAPE)
    stored = store.allocate(SHAPE, torch.float32, parked=True)  # no separate store: parked means nothing
    assert not stored.parked and stored.shape == SHAPE
    assert torch.equal(write_and_read(store, stored, x, [(0, 3), (3, 11)]), x)
    assert store.live == {"device": NBYTES, "host": 0}
    store.release(stored)
    assert store.live == {"device": 0, "host": 0} and store.peak == {"device": NBYTES, "host": 0}


def test_host_tier_is_row_major_and_round_trips_exactly() -> None:
    store = BandStore(CPU, "cpu", arena=HostArena(pin=False))
    x = torch.randn(SHAPE)
    for tokens in (False, True):
        stored = store.allocate(SHAPE, torch.float32, parked=True, tokens=tokens)
        assert stored.parked and stored.shape == SHAPE
        assert stored.tensor.shape[0] == 11  # rows first: a band is one contiguous block
        assert stored.physical_rows(2, 6).is_contiguous()
        transfers = Transfers(CPU, store)
        transfers.put(stored, 0, 11, x)
        assert transfers.written == NBYTES
        fetched = transfers.ready(transfers.fetch(stored, 2, 6))
        assert transfers.fetched == 2 * 3 * 4 * 5 * 4
        assert torch.equal(fetched, x[:, :, 2:6])
        assert torch.equal(write_and_read(store, stored, x, [(0, 1), (1, 7), (7, 11)]), x)
        store.release(stored)
    assert store.live == {"device": 0, "host": 0}
    assert store.peak == {"device": 0, "host": NBYTES}


def test_device_share_is_respected_and_peaks_are_counted_per_side() -> None:
    store = BandStore(CPU, "cpu", device_store_bytes=2 * NBYTES, arena=HostArena(pin=False))
    first, second, third = (store.allocate(SHAPE, torch.float32, parked=False) for _ in range(3))
    assert [s.parked for s in (first, second, third)] == [False, False, True]  # the third would pass it
    skip = store.allocate(SHAPE, torch.float32, parked=True)
    assert skip.parked  # parked activations always go to the store device
    assert store.live == {"device": 2 * NBYTES, "host": 2 * NBYTES}
    store.release(first)
    again = store.allocate(SHAPE, torch.float32, parked=False)
    assert not again.parked  # room again on the device
    scratch = store.scratch((1000,), torch.float64)  # on the device, counted until released
    assert store.live == {"device": 2 * NBYTES + 8000, "host": 2 * NBYTES}
    for item in (second, third, skip, again, scratch):
        store.release(item)
    assert store.live == {"device": 0, "host": 0}
    assert store.peak == {"device": 2 * NBYTES + 8000, "host": 2 * NBYTES}


def test_host_arena_first_fit_and_kept_across_calls() -> None:
    arena = HostArena(pin=False)
    sizes = [(3, 4096), (2, 4096), (5, 4096)]  # float32: 12, 8 and 20 pages of 4 KiB

    def one_call() -> list[tuple[torch.Tensor, tuple[int, int]]]:
        arena.begin()
        a, b, c = (arena.allocate(shape, torch.float32) for shape in sizes)
        arena.release(b[1])
        d = arena.allocate((2, 4096), torch.float32)  # fits the gap b left: first fit reuses it
        assert d[1] == b[1]
        for item in (a, c, d):
            arena.release(item[1])
        assert arena.top == 0 and arena.free == []
        arena.finish()
        return [a, b, c, d]

    one_call()
    assert arena.capacity == arena.high == (12 + 8 + 20) * 4096  # grown to what the call needed
    buffer = arena.buffer
    assert buffer is not None
    start, stop = buffer.data_ptr(), buffer.data_ptr() + arena.capacity
    for tensor, _ in one_call():  # the second call's tensors are views into the kept buffer
        assert start <= tensor.data_ptr() < stop
    assert arena.buffer is buffer
    arena.drop()
    assert arena.buffer is None and arena.capacity == 0


def test_meta_store_accounts_the_side_it_would_use() -> None:
    meta = torch.device("meta")
    store = BandStore(meta, "cpu", arena=HostArena(pin=False))
    assert store.arena is None  # planning traces never touch host memory
    stored = store.allocate(SHAPE, torch.float16, parked=True)
    assert stored.tensor.device.type == "meta" and stored.parked
    assert store.peak == {"device": 0, "host": NBYTES // 2}


def test_row_blocks_append_read_and_release_a_prefix() -> None:
    """A streaming engine's pattern: rows appended in uneven pieces, read across blocks, freed in order;
    blocks on the device while the device share has room, then on the host."""
    row_bytes = 2 * 3 * 5 * 4
    store = BandStore(CPU, "cpu", device_store_bytes=4 * row_bytes, arena=HostArena(pin=False))
    x = torch.randn(SHAPE)
    blocks = RowBlocks(store, SHAPE, torch.float32, block_bytes=3 * row_bytes)  # blocks of 3 rows
    for start, stop in ((0, 2), (2, 7), (7, 8), (8, 11)):
        blocks.append(x[:, :, start:stop])
    assert blocks.rows == 11 and [b.shape[2] for b in blocks.blocks] == [3, 3, 3, 2]
    assert [b.parked for b in blocks.blocks] == [False, True, True, True]  # a second block would pass 4 rows
    assert store.live == {"device": 3 * row_bytes, "host": 8 * row_bytes}
    assert torch.equal(blocks.read(0, 11), x)
    assert torch.equal(blocks.read(2, 7), x[:, :, 2:7])
    blocks.release_before(5)  # frees the first block only: the second still holds rows 3..5
    assert store.live == {"device": 0, "host": 8 * row_bytes}
    assert torch.equal(blocks.read(5, 9), x[:, :, 5:9])
    with pytest.raises(ValueError, match="released"):
        blocks.read(1, 4)
    blocks.release_before(11)
    assert store.live == {"device": 0, "host": 0}
    assert store.total_peak == 11 * row_bytes
    assert store.peak == {"device": 3 * row_bytes, "host": 8 * row_bytes}
    store.reset_peaks()
    assert store.peak == {"device": 0, "host": 0} and store.total_peak == 0


def test_adopted_tensors_are_counted_on_their_side_and_leave_the_device_share_to_blocks() -> None:
    """An engine's input, output or keys and values on the store device count on the host side, so the
    device share still fits as many blocks; on the compute device (or with no separate store) they count
    on the device side."""
    row_bytes = 2 * 3 * 5 * 4
    store = BandStore(CPU, "cpu", device_store_bytes=3 * row_bytes)
    x = torch.randn(SHAPE)
    source = RowBlocks.holding(store, x, parked=True)
    assert store.live == {"device": 0, "host": NBYTES}
    assert torch.equal(source.read(3, 9), x[:, :, 3:9])
    blocks = RowBlocks(store, SHAPE, torch.float32, block_bytes=3 * row_bytes)
    blocks.append(x[:, :, :4])
    assert [b.parked for b in blocks.blocks] == [False, True]  # the whole share went to the first block
    on_device = store.adopt(torch.empty(10), parked=False)
    assert store.live == {"device": 3 * row_bytes + 40, "host": NBYTES + 3 * row_bytes}
    store.release(on_device)
    source.release_before(11)  # a held tensor is released like a block once all its rows were read
    assert store.live == {"device": 3 * row_bytes, "host": 3 * row_bytes}
    assert store.total_peak == NBYTES + 6 * row_bytes + 40
    unified = BandStore(CPU)  # no separate store: everything is on the device side
    unified.adopt(x, parked=True)
    assert unified.live == {"device": NBYTES, "host": 0}


def test_row_blocks_read_from_the_store_device_is_nchw_contiguous() -> None:
    """Parked rows are one contiguous block on the store device and arrive laid out NCHW."""
    store = BandStore(CPU, "cpu")  # no device share: every block parked
    x = torch.randn(SHAPE)
    blocks = RowBlocks(store, SHAPE, torch.float32, block_bytes=NBYTES)
    blocks.append(x)
    assert blocks.blocks[0].parked and blocks.blocks[0].physical_rows(2, 6).is_contiguous()
    rows = blocks.read(2, 6)
    assert rows.is_contiguous() and torch.equal(rows, x[:, :, 2:6])
