"""A ComfyUI VAE's weights as a diffusers ``AutoencoderKL``, which linfusion's exact tiled VAE runs.

ComfyUI keeps the VAE in the original (LDM) layout: ``encoder.down.0.block.0.conv1`` ... The architecture
is read from the state dict's shapes (levels, widths, blocks per level, whether there is a mid-block
attention and quant convolutions), the keys are converted with diffusers' own LDM converter, and the
result is cached per ComfyUI VAE module and the storage of its weights (weights ComfyUI replaces, moves or
casts are converted again; the converted model shares the weights' memory where it can).
"""

from __future__ import annotations

import re
import weakref
from typing import Any

import torch
from torch import nn

from .unet_patch import LinFusionNodeError

_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[int, nn.Module]] = weakref.WeakKeyDictionary()
_LEVEL = re.compile(r"^decoder\.up\.(\d+)\.")
_BLOCK = re.compile(r"^encoder\.down\.0\.block\.(\d+)\.")


def vae_config(state_dict: dict[str, torch.Tensor], norm_groups: int) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` config of an LDM-layout KL VAE state dict."""
    if "decoder.conv_in.weight" not in state_dict or "encoder.conv_in.weight" not in state_dict:
        raise LinFusionNodeError(
            "LinFusion's VAE nodes take Stable Diffusion's KL VAEs (SD-1.x, SD-2.x, SD-XL); this VAE has no "
            "LDM encoder/decoder (TAESD, Stable Cascade and video VAEs are not supported)."
        )
    if any(key.endswith("mix_factor") for key in state_dict):
        raise LinFusionNodeError("LinFusion's VAE nodes do not support video (temporal) VAE decoders.")
    levels = 1 + max(int(m.group(1)) for key in state_dict if (m := _LEVEL.match(key)))
    widths = [int(state_dict[f"decoder.up.{level}.block.0.conv2.weight"].shape[0]) for level in range(levels)]
    blocks = 1 + max(int(m.group(1)) for key in state_dict if (m := _BLOCK.match(key)))
    return {
        "in_channels": int(state_dict["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state_dict["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": widths,
        "layers_per_block": blocks,
        "latent_channels": int(state_dict["decoder.conv_in.weight"].shape[1]),
        "norm_num_groups": norm_groups,
        "mid_block_add_attention": "decoder.mid.attn_1.q.weight" in state_dict,
        "use_quant_conv": "quant_conv.weight" in state_dict,
        "use_post_quant_conv": "post_quant_conv.weight" in state_dict,
    }


def diffusers_vae(comfy_vae: Any) -> nn.Module:
    """The ComfyUI VAE as a diffusers ``AutoencoderKL`` on the VAE's device and dtype (cached)."""
    module = getattr(comfy_vae, "first_stage_model", None)
    if module is None:
        raise LinFusionNodeError("this VAE has no weights loaded (ComfyUI could not recognise its file).")
    state_dict = module.state_dict()
    fingerprint = hash(
        tuple((key, value.data_ptr(), value.dtype, value.device) for key, value in state_dict.items())
    )
    cached = _CACHE.get(module)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    norm = getattr(getattr(module, "decoder", None), "norm_out", None)
    config = vae_config(state_dict, int(getattr(norm, "num_groups", 32)))
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint(dict(state_dict), vae.config)
    vae.load_state_dict(converted, strict=True, assign=True)
    vae = vae.to(device=comfy_vae.device, dtype=comfy_vae.vae_dtype).eval().requires_grad_(False)
    _CACHE[module] = (fingerprint, vae)
    return vae
