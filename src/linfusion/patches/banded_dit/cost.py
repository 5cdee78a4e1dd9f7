"""The banded DiT's cost model: device and host bytes, FLOPs and host traffic of one call, predicted without
computing anything, by walking the same passes on ``meta`` (one band of each size traced per kind of pass),
in well under a second at 16K."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .patch import DEFAULT_BAND_BYTES, BandedDiT


@dataclass(frozen=True)
class DiTCost:
    """What one banded DiT call costs (activations only: the weights come on top of ``device_peak``).

    FLOPs count multiply-adds as two, as ``torch.utils.flop_counter.FlopCounterMode`` does.
    """

    device_peak: int  # bytes on the transformer's device: its share of the store plus one band's working set
    host_peak: int  # bytes of the stream kept on the store device (0 without a separate store)
    flops: int  # the banded forward
    plain_flops: int  # the unbanded LinFusion forward (the same less the captions' per-band projections)
    moved_bytes: int  # bytes copied between the store device and the transformer's device
    passes: int  # passes over the whole sequence (blocks + 1)

    @property
    def flop_overhead(self) -> float:
        return self.flops / self.plain_flops


def meta_dit_inputs(
    transformer: nn.Module, batch: int, latent_height: int, latent_width: int, dtype: torch.dtype,
    caption_tokens: int,
) -> dict[str, object]:  # fmt: skip
    """Keyword arguments of one PixArt transformer call on ``meta`` (latent, captions and their mask,
    timestep, PixArt-Alpha's resolution and aspect-ratio conditions)."""
    config = transformer.config
    meta = {"device": "meta", "dtype": dtype}
    added = {"resolution": None, "aspect_ratio": None}
    if transformer.use_additional_conditions:
        added = {"resolution": torch.empty(batch, 2, **meta), "aspect_ratio": torch.empty(batch, 1, **meta)}
    return {
        "hidden_states": torch.empty(batch, config.in_channels, latent_height, latent_width, **meta),
        "encoder_hidden_states": torch.empty(batch, caption_tokens, config.caption_channels, **meta),
        "encoder_attention_mask": torch.empty(batch, caption_tokens, **meta),
        "timestep": torch.empty(batch, device="meta", dtype=torch.long),
        "added_cond_kwargs": added,
    }


def banded_dit_cost(
    transformer: nn.Module,
    width: int,
    height: int,
    *,
    dtype: torch.dtype = torch.float16,
    batch: int = 2,
    band_bytes: int = DEFAULT_BAND_BYTES,
    store_on_host: bool = True,
    device_store_bytes: int | None = None,
    vae_scale_factor: int = 8,
    caption_tokens: int = 300,
) -> DiTCost:
    """The cost of one banded call at ``width`` x ``height`` px, without computing anything.

    ``transformer``: a PixArt transformer on ``meta`` with LinFusion mounted (the planner's structure copy;
    only its structure is used). ``batch`` 2 is classifier-free guidance in one call; 1 is one branch.
    ``store_on_host``: a separate store (``store_device="cpu"``) with ``device_store_bytes`` of it allowed
    on the device.
    """
    if next(transformer.parameters()).device.type != "meta":
        raise ValueError("banded_dit_cost traces a structure on the meta device; pass a copy built on meta")
    inputs = meta_dit_inputs(
        transformer, batch, height // vae_scale_factor, width // vae_scale_factor, dtype, caption_tokens
    )
    banded = BandedDiT(
        transformer,
        band_bytes=band_bytes,
        store_device="cpu" if store_on_host else None,
        device_store_bytes=device_store_bytes,
    )
    hidden = inputs.pop("hidden_states")
    captions = inputs.pop("encoder_hidden_states")
    timestep = inputs.pop("timestep")
    run = banded.traced_cost(hidden, captions, timestep, **inputs)
    return DiTCost(
        device_peak=max(run.working_peak, run.store.peak["device"]),
        host_peak=run.store.peak["host"],
        flops=run.flops,
        plain_flops=run.flops - run.repeated_flops,
        moved_bytes=run.transfers.fetched + run.transfers.written,
        passes=run.passes,
    )


__all__ = ["DiTCost", "banded_dit_cost", "meta_dit_inputs"]
