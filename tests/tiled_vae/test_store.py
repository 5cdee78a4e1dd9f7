"""The row store: blocks fill the compute device's share first and are freed as they are read."""

from __future__ import annotations

import torch

from linfusion.tiled_vae.store import RowStore, StoreUsage


def test_store_fills_its_device_share_first() -> None:
    """With a store device other than the VAE's, chunks stay on the VAE's device while the share has room
    (here the store device is ``meta``: placement only, no values)."""
    usage = StoreUsage(device_share=3 * 4096)
    store = RowStore(torch.device("meta"), torch.device("cpu"), usage, height=12, block_bytes=4096)
    store.append(torch.zeros(1, 4, 3, 128))  # rows of 2048 bytes, blocks of 2 rows
    store.append(torch.zeros(1, 4, 7, 128))
    assert [block.device.type for block in store.blocks] == ["cpu"] * 3 + ["meta"] * 2
    assert usage.device_live == 3 * 4096 and usage.live == 5 * 4096
    store.release(5)  # rows 0-3 read: their two blocks are freed, the third is still partly unread
    assert usage.device_live == 4096 and usage.live == 3 * 4096
    store.append(torch.zeros(1, 4, 2, 128))
    assert store.blocks[-1].device.type == "cpu"
