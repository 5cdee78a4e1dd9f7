"""A stage's memory savers as one value (:class:`Savers`) and the one place they become patches.

The memory planner chooses a :class:`Savers` per stage; :func:`apply_savers` turns it on a pipeline (the
banded UNet or banded DiT, the denoiser's savers, the exact tiled VAE, model CPU offload) as one reversible
:class:`~linfusion.patches.base.Patch`. Both live here, below the planner, so the pipelines and the
application apply a plan without importing the planner's search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..io import MIB, format_size
from ..model import denoiser_of
from .banded_dit import apply_banded_dit
from .banded_unet import apply_banded_unet
from .base import Patch, set_attribute
from .savers import apply_memory_savers
from .tiling import apply_exact_tiling

# The working memory of one band of the banded UNet and of one pass of the tiled VAE, as planned.
DEFAULT_BAND_BYTES = 256 * MIB
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the pipeline components that encode the prompt


@dataclass(frozen=True)
class Savers:
    """What the plan turns on. Each is exact (same image); each costs some speed."""

    sequential_cfg: bool = False
    feed_forward_chunk: int | None = None
    skip_offload: bool = False
    tiled_vae: bool = False
    model_offload: bool = False  # only the model at work on the device (diffusers' model CPU offload)
    # with model offload: the text encoders stay on the CPU and encode the prompt there (a DiT's T5-XXL)
    text_encoder_on_cpu: bool = False
    banded_unet: bool = False  # the UNet layer by layer over row bands (exact, bounded memory)
    banded_dit: bool = False  # a PixArt transformer block by block over token bands (exact, bounded)
    unet_store_on_host: bool = False  # the banded UNet's (or DiT's) whole activations in host memory
    unet_device_store_bytes: int | None = None  # ... of which this many bytes may stay on the device
    vae_store_on_host: bool = False  # the tiled VAE's store in host memory ...
    vae_store_limit_bytes: int | None = None  # ... holding at most this many bytes (None: no limit)
    vae_device_store_bytes: int = 0  # ... of which this many stay on the device

    def names(self) -> list[str]:
        names = []
        if self.banded_unet or self.banded_dit:
            where = "on the device"
            if self.unet_store_on_host:
                kept = format_size(self.unet_device_store_bytes or 0)
                where = (
                    f"on the host ({kept} kept on the device)"
                    if self.unet_device_store_bytes
                    else "on the host"
                )
            names.append(f"banded {'DiT' if self.banded_dit else 'UNet'}, activations {where}")
        if self.sequential_cfg:
            names.append("CFG branches one at a time")
        if self.feed_forward_chunk:
            names.append(f"feed-forward in chunks of {self.feed_forward_chunk} tokens")
        if self.skip_offload:
            names.append("skip tensors parked on the CPU")
        if self.tiled_vae:
            where = "host" if self.vae_store_on_host else "device"
            limit = (
                f", at most {format_size(self.vae_store_limit_bytes)}"
                if self.vae_store_limit_bytes is not None
                else ""
            )
            names.append(f"exact tiled VAE (store on the {where}{limit})")
        if self.model_offload:
            names.append("model CPU offload")
        if self.text_encoder_on_cpu:
            names.append("prompt encoded on the CPU")
        return names or ["none needed"]


def apply_savers(pipe: Any, savers: Savers) -> Patch:
    """Turn on what ``savers`` says on ``pipe`` (the denoiser's savers, exact VAE tiling, model offload, the
    text encoders kept on the CPU).

    The one place a stage plan becomes patches; ``remove()`` restores the pipeline as it was. The denoiser
    is ``pipe.unet`` or, on a diffusion-transformer pipeline, ``pipe.transformer``.
    """
    denoiser = denoiser_of(pipe)
    patch = Patch("stage savers")
    try:  # the banded model first, then what wraps it; model offload wraps the denoiser's forward last
        if savers.banded_dit:
            patch.add(
                apply_banded_dit(
                    denoiser,
                    band_bytes=DEFAULT_BAND_BYTES,
                    store_device="cpu" if savers.unet_store_on_host else None,
                    device_store_bytes=savers.unet_device_store_bytes,
                )
            )
        if savers.banded_unet:
            patch.add(
                apply_banded_unet(
                    pipe.unet,
                    band_bytes=DEFAULT_BAND_BYTES,
                    store_device="cpu" if savers.unet_store_on_host else None,
                    device_store_bytes=savers.unet_device_store_bytes,
                )
            )
        patch.add(
            apply_memory_savers(
                denoiser,
                feed_forward_chunk=savers.feed_forward_chunk,
                sequential_cfg=savers.sequential_cfg,
                skip_offload="cpu" if savers.skip_offload else None,
            )
        )
        if savers.tiled_vae:
            patch.add(
                apply_exact_tiling(
                    pipe.vae,
                    band_bytes=DEFAULT_BAND_BYTES,
                    store_device="cpu" if savers.vae_store_on_host else None,
                    store_limit_bytes=savers.vae_store_limit_bytes,
                    device_store_bytes=savers.vae_device_store_bytes,
                )
            )
        if savers.model_offload:
            patch.add(apply_model_offload(pipe))
        if savers.text_encoder_on_cpu:
            patch.add(apply_text_encoder_on_cpu(pipe))
    except BaseException:
        patch.remove()
        raise
    return patch


def apply_model_offload(pipe: Any) -> Patch:
    """diffusers' model CPU offload (only the model at work on the device); ``remove()`` moves it all back."""
    device = denoiser_of(pipe).device
    models = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    attributes = [set(model.__dict__) for model in models]
    pipe.enable_model_cpu_offload(device=device)
    patch = Patch("model CPU offload")

    def undo() -> None:
        pipe.remove_all_hooks()
        pipe.to(device)
        for model, before in zip(models, attributes):  # accelerate leaves its restored forward behind
            for name in set(model.__dict__) - before:
                del model.__dict__[name]

    patch.on_remove(undo)
    return patch


def cpu_encode_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a text encoder kept on the CPU computes in: float32 for float16 (CPUs without native
    half-precision arithmetic multiply it ~30x slower; float16 -> float32 -> float16 is exact), else its own.
    The encode (``pipelines.dit``), its host bytes (the planner) and its predicted time (``app.plan``) all
    follow this rule."""
    return torch.float32 if dtype == torch.float16 else dtype


def apply_text_encoder_on_cpu(pipe: Any) -> Patch:
    """Take the text encoders out of model CPU offload's hooks and keep them on the CPU.

    The prompt is then encoded on the CPU (:func:`linfusion.pipelines.dit.encode_conditioning` encodes on
    the text encoder's device) and only its small embeddings reach the device, so a T5-XXL larger than the
    device never needs to fit there. Apply it after model CPU offload; ``remove()`` puts the encoders'
    offload hooks back as they were.
    """
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    encoders = {name: getattr(pipe, name, None) for name in TEXT_ENCODERS}
    encoders = {name: encoder for name, encoder in encoders.items() if isinstance(encoder, torch.nn.Module)}
    if any(getattr(encoder, "_hf_hook", None) is None for encoder in encoders.values()):
        raise ValueError(
            "the prompt is encoded on the CPU only under model CPU offload: turn offload on first"
        )
    patch = Patch("prompt encoded on the CPU")
    try:
        for encoder in encoders.values():
            hook = encoder._hf_hook
            remove_hook_from_module(encoder)
            patch.on_remove(lambda encoder=encoder, hook=hook: add_hook_to_module(encoder, hook))
            encoder.to("cpu")
        # diffusers' ``_execution_device`` skips these models: it reads the device from the offloaded ones
        excluded = [*pipe._exclude_from_cpu_offload, *encoders]
        patch.add(set_attribute(pipe, "_exclude_from_cpu_offload", excluded, "text encoders kept on the CPU"))
    except BaseException:
        patch.remove()
        raise
    return patch


__all__ = [
    "DEFAULT_BAND_BYTES",
    "TEXT_ENCODERS",
    "Savers",
    "apply_model_offload",
    "apply_savers",
    "apply_text_encoder_on_cpu",
    "cpu_encode_dtype",
]
