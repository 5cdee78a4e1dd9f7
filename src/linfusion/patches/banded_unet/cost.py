"""The banded UNet's cost model: device and host bytes, FLOPs, host traffic and passes of one call,
predicted without computing anything, by walking the same schedule on ``meta`` (one band traced per
pass, FLOPs counted analytically), in well under a second at 16K."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from ...attention import GeneralizedLinearAttention
from ..banded_shell import DEFAULT_BAND_BYTES, BandedCost
from .patch import BandedUNet


@dataclass(frozen=True)
class UNetCost(BandedCost):
    """What one banded UNet call costs; FLOPs count convolutions, linear layers and attention products."""


def meta_unet_inputs(
    config: Any,
    batch: int,
    latent_height: int,
    latent_width: int,
    dtype: torch.dtype,
    context_tokens: int = 77,
) -> dict[str, Any]:
    """Keyword arguments of one UNet call on ``meta`` (sample, timestep, text context, SD-XL's added conditions)."""
    options: dict[str, Any] = {
        "sample": torch.empty(
            batch, config.in_channels, latent_height, latent_width, device="meta", dtype=dtype
        ),
        "timestep": torch.tensor(999, device="meta"),
        "encoder_hidden_states": torch.empty(
            batch, context_tokens, config.cross_attention_dim, device="meta", dtype=dtype
        ),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        options["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, pooled, device="meta", dtype=dtype),
            "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype),
        }
    return options


def _linfusion_layers(unet: nn.Module) -> list[dict[str, Any]]:
    return [
        {"module_name": name, "dim_n": m.dim, "heads": m.heads, "projection_mid_dim": m.projection_mid_dim}
        for name, m in unet.named_modules()
        if isinstance(m, GeneralizedLinearAttention)
    ]


@lru_cache(maxsize=8)
def _meta_unet(config_json: str, layers_json: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel

    from ...model import LinFusion

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    layers = json.loads(layers_json)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).eval()
        if layers == "default":
            LinFusion.from_unet(unet).mount(unet)
        elif layers:
            LinFusion(modules_list=layers).mount(unet)
    # nn.Module.to: diffusers' override warns about modules kept in fp32, which a structure copy ignores
    return nn.Module.to(unet, dtype)


def banded_unet_cost(
    unet: nn.Module | dict[str, Any],
    width: int,
    height: int,
    *,
    dtype: torch.dtype = torch.float16,
    batch: int = 2,
    band_bytes: int = DEFAULT_BAND_BYTES,
    store_on_host: bool = True,
    device_store_bytes: int | None = None,
    linfusion: bool = True,
    vae_scale_factor: int = 8,
    context_tokens: int = 77,
) -> UNetCost:
    """The cost of one banded call at ``width`` x ``height`` px, without computing anything.

    ``unet``: a UNet (its structure and LinFusion layers are used, never its weights) or a UNet config
    dict. ``linfusion``: with LinFusion ``attn1`` layers (the UNet's own when it has them, else the default
    ones) or with the softmax ones. ``batch`` 2 is classifier-free guidance in one call; 1 is one branch
    (the CFG branches one after the other). ``store_on_host``: a separate store (``store_device="cpu"``)
    with ``device_store_bytes`` bytes of it allowed on the device.
    """
    config = dict(unet.config) if isinstance(unet, nn.Module) else dict(unet)
    layers: Any = []
    if linfusion:
        layers = (_linfusion_layers(unet) if isinstance(unet, nn.Module) else []) or "default"
    meta = _meta_unet(json.dumps(config, sort_keys=True, default=list), json.dumps(layers), dtype)
    inputs = meta_unet_inputs(
        meta.config, batch, height // vae_scale_factor, width // vae_scale_factor, dtype, context_tokens
    )
    banded = BandedUNet(
        meta,
        band_bytes=band_bytes,
        store_device="cpu" if store_on_host else None,
        device_store_bytes=device_store_bytes,
    )
    run = banded.traced_cost(**inputs)
    return UNetCost.of_run(run, plain_flops=run.plain_flops)


__all__ = ["UNetCost", "banded_unet_cost", "meta_unet_inputs"]
