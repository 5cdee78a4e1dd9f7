"""The store: activations kept between passes, in blocks of whole rows, freed block by block once read.

Interface the tiler relies on (:mod:`.tiler`), kept in this one module so that another row store can
replace it:

- ``StoreUsage(device_share)``: the store's own byte count. ``add(size, on_device=False)`` (negative to
  free), ``restart()`` (the peak starts again from what is live); ``live``, ``peak``, ``device_live`` and
  ``device_share`` (bytes of the store that may stay on the compute device).
- ``RowStore(device, compute_device, usage, height, block_bytes)``: one activation of ``height`` rows,
  written in order by ``append(rows)`` and read by ``read(start, stop, device)``; ``release(stop)`` frees
  the blocks that end at or before row ``stop``. Blocks go to the compute device while ``usage`` has
  device share left, else to ``device``. ``RowStore.holding(tensor, compute_device, usage)`` wraps the
  caller's input as one block that is never freed. Tensors are (batch, channels, rows, width); rows are
  dimension 2.
"""

from __future__ import annotations

import bisect

import torch

# The store allocates whole-row blocks of about this size and frees a block once all its rows were read.
# 32 MiB is glibc's largest dynamic mmap threshold: blocks this large are mapped and unmapped on their own,
# so freed ones go back to the system instead of fragmenting the heap (measured: with ~2 MiB chunks the
# CPU peak RSS sat 30 % above the live bytes).
DEFAULT_STORE_BLOCK_BYTES = 32 * 2**20


class StoreUsage:
    """Bytes the store holds now and at most since the last :meth:`restart` (the tiler's own count), and
    the part of it kept on the compute device (at most ``device_share``)."""

    def __init__(self, device_share: int = 0) -> None:
        self.live = self.peak = self.device_live = 0
        self.device_share = device_share

    def add(self, size: int, on_device: bool = False) -> None:
        """Count ``size`` bytes more (negative: freed), ``on_device`` when they sit on the compute device."""
        self.live += size
        self.peak = max(self.peak, self.live)
        if on_device:
            self.device_live += size

    def restart(self) -> None:
        """Start a new peak from what is live now (the tiler does at each pass)."""
        self.peak = self.live


class RowStore:
    """An activation kept in blocks of whole rows, freed block by block once read: on the compute device
    while the usage's device share has room, else on the store device."""

    def __init__(self, device: torch.device, compute_device: torch.device, usage: StoreUsage, height: int,
                 block_bytes: int):  # fmt: skip
        self.device, self.compute_device, self.usage = device, compute_device, usage
        self.height, self.block_bytes = height, block_bytes
        self.blocks: list[torch.Tensor | None] = []
        self.on_device: list[bool] = []
        self.starts: list[int] = []
        self.rows = 0  # rows written
        self._first_kept = 0

    @classmethod
    def holding(cls, tensor: torch.Tensor, compute_device: torch.device, usage: StoreUsage) -> RowStore:
        """The caller's tensor itself, as one block (never freed here)."""
        store = cls(tensor.device, compute_device, usage, tensor.shape[2], 0)
        store.blocks, store.on_device, store.starts, store.rows = [tensor], [False], [0], tensor.shape[2]
        usage.add(tensor.numel() * tensor.element_size())
        return store

    def append(self, rows: torch.Tensor) -> None:
        """Write the next ``rows`` (dimension 2), opening blocks as the last one fills."""
        written = 0
        while written < rows.shape[2]:
            block = self.blocks[-1] if self.blocks else None
            filled = self.rows - self.starts[-1] if self.blocks else 0
            if block is None or filled == block.shape[2]:
                block, filled = self._new_block(rows), 0
            count = min(rows.shape[2] - written, block.shape[2] - filled)
            block[:, :, filled : filled + count] = rows[:, :, written : written + count]
            written += count
            self.rows += count

    def _new_block(self, rows: torch.Tensor) -> torch.Tensor:
        batch, channels, _, width = rows.shape
        row_bytes = batch * channels * width * rows.element_size()
        block_rows = min(self.height - self.rows, max(1, -(-self.block_bytes // row_bytes)))
        size = block_rows * row_bytes
        on_device = self.usage.device_live + size <= self.usage.device_share
        device = self.compute_device if on_device else self.device
        block = torch.empty(batch, channels, block_rows, width, dtype=rows.dtype, device=device)
        self.blocks.append(block)
        self.on_device.append(on_device)
        self.starts.append(self.rows)
        self.usage.add(size, on_device)
        return block

    def read(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Rows ``start`` to ``stop`` (not yet released), on ``device``."""
        index = bisect.bisect_right(self.starts, start) - 1
        parts = []
        while index < len(self.blocks) and self.starts[index] < stop:
            block = self.blocks[index]
            assert block is not None, "rows read after they were freed"
            first = self.starts[index]
            parts.append(block[:, :, max(start, first) - first : stop - first])
            index += 1
        rows = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return rows.to(device)

    def release(self, stop: int) -> None:
        """Free the blocks that end at or before row ``stop``."""
        while self._first_kept < len(self.blocks):
            block = self.blocks[self._first_kept]
            if block is not None and self.starts[self._first_kept] + block.shape[2] > stop:
                break
            if block is not None:
                self.usage.add(-block.numel() * block.element_size(), self.on_device[self._first_kept])
            self.blocks[self._first_kept] = None
            self._first_kept += 1


__all__ = ["DEFAULT_STORE_BLOCK_BYTES", "RowStore", "StoreUsage"]
