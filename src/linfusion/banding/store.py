"""Where a banding engine keeps whole activations while it computes them band by band.

A :class:`BandStore` hands out whole activations of logical shape ``(batch, channels, rows, width)`` on
two sides: the compute device, and (optionally) a separate store device, usually the host. On the
compute device they are kept NCHW (or NHWC for a transformer's token stream, so a band of rows is a run
of whole tokens); on the store device rows come first, ``(rows, batch, channels, width)``, so a band is
one contiguous block and moves in one copy each way. Host-side activations are carved out of one
:class:`HostArena` kept across calls (pinned once for a GPU). ``device_store_bytes`` lets up to that many
bytes of the working stream stay on the compute device; activations asked for as ``parked`` (those that
wait longest, such as a UNet's skip tensors) always go to the store device. The store counts the bytes
each side holds now and at most, a caller's own tensors included once adopted (:meth:`BandStore.adopt`). :class:`RowBlocks` keeps an activation that a streaming engine writes
and frees in row order (append rows, read any range, release a prefix) in blocks from the same store.
:class:`Transfers` moves bands between the sides (on CUDA on a side stream, so the next band's copy
overlaps the current band's compute).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .statistics import Moments

# Physical layouts of stored activations, as permutations of the logical (batch, channels, rows, width).
# On the compute device: plain NCHW for conv activations, NHWC for a transformer's token stream (a band of
# rows is then a run of whole tokens). On a separate store: rows first, so a band is one contiguous block.
CONV_ON_DEVICE = (0, 1, 2, 3)
TOKENS_ON_DEVICE = (0, 2, 3, 1)
CONV_PARKED = (2, 0, 1, 3)
TOKENS_PARKED = (2, 0, 3, 1)


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(order.index(axis) for axis in range(len(order)))


@dataclass(eq=False)
class StoredActivation:
    """A whole activation (logical shape (B, C, H, W)) in the store, in a physical ``order``."""

    tensor: torch.Tensor
    order: tuple[int, ...]
    parked: bool  # on the store device, not on the compute device
    moments: Moments | None = None  # its GroupNorm statistics, when the engine gathers them
    slot: tuple[int, int] | None = None  # its place in the host arena

    @classmethod
    def wrapping(cls, tensor: torch.Tensor) -> StoredActivation:
        """A caller's NCHW tensor on the compute device, read like a stored activation (never released)."""
        return cls(tensor, CONV_ON_DEVICE, parked=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        physical = self.tensor.shape
        return tuple(physical[self.order.index(axis)] for axis in range(4))  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def physical_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor.narrow(self.order.index(2), start, stop - start)

    def logical(self, physical: torch.Tensor) -> torch.Tensor:
        return physical.permute(_inverse(self.order))


class HostArena:
    """One host buffer that a separate store sub-allocates (first fit, 4 KiB aligned), kept across calls.

    PyTorch's pinned allocator rounds every block up to a power of two and caches freed blocks per size: on
    the UNet's allocation sequence at 16384x16384 that held 2.5x the store's peak (88 GiB for a 35 GiB
    store). One buffer, pinned once (``cudaHostRegister``) when the UNet is on a GPU, holds the peak
    itself: first fit leaves no gap on that sequence. A call that needs more than the buffer holds serves
    the overflow with ordinary tensors (copied synchronously on a GPU) and grows the buffer for the next
    call, so from the second denoising step on every parked band moves by DMA.
    """

    ALIGN = 4096

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.buffer: torch.Tensor | None = None
        self._unpin: Any = None  # unregisters the buffer, also when it is garbage-collected
        self.begin()

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    def begin(self) -> None:
        """Start a call: nothing is allocated in the buffer (the previous call released everything)."""
        self.free: list[tuple[int, int]] = []  # (offset, size) of the gaps below ``top``, by offset
        self.top = 0
        self.high = 0

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, tuple[int, int]]:
        """A tensor of ``shape`` in the buffer (or an ordinary one past its end) and its slot for :meth:`release`."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        size = -(-nbytes // self.ALIGN) * self.ALIGN
        index = next((i for i, (_, gap) in enumerate(self.free) if gap >= size), None)
        if index is not None:
            offset, gap = self.free.pop(index)
            if gap > size:
                self.free.insert(index, (offset + size, gap - size))
        else:
            offset = self.top
            self.top += size
            self.high = max(self.high, self.top)
        if self.buffer is not None and offset + size <= self.capacity:
            tensor = self.buffer[offset : offset + nbytes].view(dtype).view(shape)
        else:
            tensor = torch.empty(shape, dtype=dtype)
        return tensor, (offset, size)

    def release(self, slot: tuple[int, int]) -> None:
        self.free.append(slot)
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for offset, size in self.free:
            if merged and sum(merged[-1]) == offset:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((offset, size))
        if merged and sum(merged[-1]) == self.top:
            self.top = merged.pop()[0]
        self.free = merged

    def finish(self) -> None:
        """End a call: grow the buffer to what the call needed."""
        if self.high <= self.capacity:
            return
        self.drop()
        self.buffer = torch.empty(self.high, dtype=torch.uint8)
        if self.pin:
            pointer = self.buffer.data_ptr()
            error = int(torch.cuda.cudart().cudaHostRegister(pointer, self.high, 1))  # 1: portable
            if error:
                raise RuntimeError(f"pinning {self.high} bytes of host memory failed with CUDA error {error}")
            self._unpin = weakref.finalize(self.buffer, _unpin_host, pointer)

    def drop(self) -> None:
        """Give the buffer back (after the device's copies that may still use it)."""
        if self._unpin is not None:
            self._unpin()
            self._unpin = None
        self.buffer = None


def _unpin_host(pointer: int) -> None:
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaHostUnregister(pointer)


class BandStore:
    """Where whole activations live, and how many bytes each side holds now and at most.

    Without ``store_device`` everything stays on the compute device. With it, activations go to
    ``store_device`` (into a :class:`HostArena` when that is the CPU), except that the working
    stream stays on the compute device while its bytes fit ``device_store_bytes``; activations asked for
    as ``parked`` (those that wait longest) always go to ``store_device``. On ``meta`` (planning traces)
    the store's tensors stay on ``meta`` but are still accounted to the side they would be on.
    """

    def __init__(
        self,
        device: torch.device,
        store_device: torch.device | str | None = None,
        device_store_bytes: int = 0,
        arena: HostArena | None = None,
    ) -> None:
        self.device = device
        self.separate = store_device is not None
        self.store_device = torch.device(store_device) if store_device is not None else device
        if device.type == "meta":
            self.store_device = device
        self.device_store_bytes = device_store_bytes if self.separate else None
        # host-side activations come from ``arena`` when the store is the CPU (see HostArena)
        self.arena = arena if self.separate and self.store_device.type == "cpu" else None
        self.live = {"device": 0, "host": 0}
        self.peak = {"device": 0, "host": 0}
        self.total_peak = 0  # both sides together, at the highest (not the sum of the two peaks)

    def _account(self, side: str, nbytes: int) -> None:
        self.live[side] += nbytes
        self.peak[side] = max(self.peak[side], self.live[side])
        self.total_peak = max(self.total_peak, self.live["device"] + self.live["host"])

    def reset_peaks(self) -> None:
        """Start measuring peaks anew from what is held now (e.g. per pass of a multi-pass engine)."""
        self.peak = dict(self.live)
        self.total_peak = self.live["device"] + self.live["host"]

    def allocate(
        self, shape: tuple[int, ...], dtype: torch.dtype, *, parked: bool, tokens: bool = False
    ) -> StoredActivation:
        """A new whole activation of logical shape (B, C, H, W); ``tokens`` for a transformer's stream."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        on_host = self.separate and (
            parked
            or self.device_store_bytes is None
            or self.live["device"] + nbytes > self.device_store_bytes
        )
        if on_host:
            order = TOKENS_PARKED if tokens else CONV_PARKED
            device = self.store_device
        else:
            order = TOKENS_ON_DEVICE if tokens else CONV_ON_DEVICE
            device = self.device
        physical = tuple(shape[axis] for axis in order)
        slot = None
        if on_host and self.arena is not None:
            tensor, slot = self.arena.allocate(physical, dtype)
        else:
            tensor = torch.empty(physical, dtype=dtype, device=device)
        self._account("host" if on_host else "device", nbytes)
        return StoredActivation(tensor, order, on_host, slot=slot)

    def scratch(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor that lives on the compute device across bands (attention state and keys, the output)."""
        return self.hold(torch.empty(shape, dtype=dtype, device=self.device))

    def adopt(self, tensor: torch.Tensor, *, parked: bool) -> StoredActivation:
        """A caller's NCHW tensor counted in the store until released, on the store device's side when
        ``parked`` (and the store is separate), else on the compute device's: an engine's input, its
        output, or keys and values it moved to the store itself."""
        parked = parked and self.separate
        self._account("host" if parked else "device", tensor.numel() * tensor.element_size())
        return StoredActivation(tensor, CONV_ON_DEVICE, parked)

    def hold(self, tensor: torch.Tensor) -> torch.Tensor:
        """Account ``tensor`` (on the compute device) until it is released; returns it."""
        self._account("device", tensor.numel() * tensor.element_size())
        return tensor

    def release(self, item: StoredActivation | torch.Tensor) -> None:
        if isinstance(item, StoredActivation):
            self._account("host" if item.parked else "device", -item.nbytes)
            item.tensor = item.tensor.new_empty(0)
            if item.slot is not None and self.arena is not None:
                self.arena.release(item.slot)
                item.slot = None
        else:
            self._account("device", -item.numel() * item.element_size())


class RowBlocks:
    """An activation written in row order and read, then freed, in row order (a streaming engine's store).

    Rows arrive by :meth:`append` and go into blocks of whole rows (about ``block_bytes`` each) allocated
    from ``store`` as they are needed, so each block lands on the compute device while the store's device
    share has room and on the store device otherwise; :meth:`read` returns any row range on the compute
    device and :meth:`release_before` frees the blocks that end at or before a row.
    """

    def __init__(
        self,
        store: BandStore,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        block_bytes: int,
    ) -> None:
        self.store, self.shape, self.dtype = store, shape, dtype
        batch, channels, self.height, width = shape
        row_bytes = batch * channels * width * dtype.itemsize
        self.block_rows = max(1, -(-block_bytes // row_bytes))
        self.blocks: list[StoredActivation | None] = []
        self.rows = 0  # rows appended so far
        self.first_kept = 0  # index of the first block not yet released

    @classmethod
    def holding(cls, store: BandStore, tensor: torch.Tensor, *, parked: bool) -> RowBlocks:
        """A caller's whole NCHW tensor as one block (see :meth:`BandStore.adopt`), read like appended rows."""
        shape = tuple(tensor.shape)
        blocks = cls(store, shape, tensor.dtype, block_bytes=0)  # type: ignore[arg-type]
        blocks.block_rows = max(1, blocks.height)
        blocks.blocks = [store.adopt(tensor, parked=parked)]
        blocks.rows = blocks.height
        return blocks

    def _block(self, row: int) -> tuple[StoredActivation, int]:
        """The block that holds ``row``, and the row's place in it."""
        block = self.blocks[row // self.block_rows]
        if block is None:
            raise ValueError(f"row {row} was read after its block was released")
        return block, row % self.block_rows

    def append(self, rows: torch.Tensor) -> None:
        """Write the next rows, a logical (B, C, rows, W) tensor."""
        written = 0
        while written < rows.shape[2]:
            if self.rows % self.block_rows == 0:
                batch, channels, _, width = self.shape
                size = min(self.block_rows, self.height - self.rows)
                self.blocks.append(
                    self.store.allocate((batch, channels, size, width), self.dtype, parked=False)
                )
            block, offset = self._block(self.rows)
            count = min(rows.shape[2] - written, block.shape[2] - offset)
            block.physical_rows(offset, offset + count).copy_(
                rows[:, :, written : written + count].permute(block.order)
            )
            written += count
            self.rows += count

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` (appended already, not released) on the compute device.

        Rows from the store device move as the one contiguous block they are there and are laid out NCHW
        on the compute device; rows already there are views.
        """
        if not 0 <= start < stop <= self.rows:
            raise ValueError(f"rows {start}..{stop} of the {self.rows} written")
        parts = []
        row = start
        while row < stop:
            block, offset = self._block(row)
            count = min(stop - row, block.shape[2] - offset)
            part = block.logical(block.physical_rows(offset, offset + count)).to(self.store.device)
            parts.append(part.contiguous() if block.parked else part)
            row += count
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def release_before(self, stop: int) -> None:
        """Free every block whose rows all lie before row ``stop``."""
        while self.first_kept < len(self.blocks):
            block = self.blocks[self.first_kept]
            if block is not None:
                if self.first_kept * self.block_rows + block.shape[2] > stop:
                    break
                self.store.release(block)
                self.blocks[self.first_kept] = None
            self.first_kept += 1


class Transfers:
    """Band copies between the store and the compute device.

    CUDA with a separate store: copies run on a side stream (from and to pinned memory) and the compute
    stream waits only for the band it needs, so the next band's fetch overlaps the current band's compute.
    Everywhere else they are plain copies; bands of activations on the compute device are views.
    """

    def __init__(self, device: torch.device, store: BandStore) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and store.separate else None
        self.fetched = 0  # bytes copied from the store device to the compute device
        self.written = 0  # bytes copied back

    def fetch(self, stored: StoredActivation, start: int, stop: int) -> Any:
        """Start bringing rows [start, stop) of ``stored`` to the compute device; :meth:`ready` waits."""
        rows = stored.physical_rows(start, stop)
        if not stored.parked:
            return stored.logical(rows)
        self.fetched += rows.numel() * rows.element_size()
        if self.stream is None:
            return stored.logical(rows.to(self.device, copy=True))
        with torch.cuda.stream(self.stream):
            copy = rows.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return (stored.logical(copy), done)

    def ready(self, fetched: Any) -> Any:
        """The tensors of a :meth:`fetch` (or a list of them), usable on the compute stream."""
        if isinstance(fetched, list):
            return [self.ready(item) for item in fetched]
        if isinstance(fetched, tuple):
            tensor, done = fetched
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            tensor.record_stream(compute)
            return tensor
        return fetched

    def put(self, stored: StoredActivation, start: int, stop: int, band: torch.Tensor) -> None:
        """Write a logical (B, C, rows, W) band into rows [start, stop) of ``stored``."""
        rows = stored.physical_rows(start, stop)
        physical = band.permute(stored.order)
        if not stored.parked:
            rows.copy_(physical)
            return
        self.written += rows.numel() * rows.element_size()
        if self.stream is None:
            rows.copy_(physical)
            return
        physical = physical.contiguous()
        computed = torch.cuda.Event()
        computed.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(computed)
        with torch.cuda.stream(self.stream):
            rows.copy_(physical, non_blocking=True)
        physical.record_stream(self.stream)

    def finish(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


__all__ = [
    "CONV_ON_DEVICE",
    "CONV_PARKED",
    "TOKENS_ON_DEVICE",
    "TOKENS_PARKED",
    "BandStore",
    "HostArena",
    "RowBlocks",
    "StoredActivation",
    "Transfers",
]
