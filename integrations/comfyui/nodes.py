"""The LinFusion nodes: linear attention on the UNet, the exact bounded-memory VAE, and its planner."""

from __future__ import annotations

import os
from typing import Any

import torch

from . import linfusion_calls as lf
from .unet_patch import (
    LinFusionNodeError,
    attn1_paths,
    attn1_signature,
    check_layers_fit,
    patched_clone,
    refuse_attn1_patches,
)
from .vae_convert import diffusers_vae

WEIGHTS_FOLDER = (
    "linfusion"  # models/linfusion/<name>/ holds config.json + diffusion_pytorch_model.safetensors
)
AUTO = "auto"
MIB = 2**20
STORE_PLACES = ("vae device", "cpu")
CATEGORY = "LinFusion"


def folder_paths_module() -> Any:
    """ComfyUI's ``folder_paths`` (a top-level module in ComfyUI, ``comfy.cmd`` in its pip packaging)."""
    try:
        import folder_paths
    except ImportError:
        from comfy.cmd import folder_paths
    return folder_paths


def register_weights_folder() -> None:
    """``models/linfusion`` as a ComfyUI model folder (extra_model_paths.yaml may add others)."""
    folder_paths = folder_paths_module()
    if WEIGHTS_FOLDER not in folder_paths.folder_names_and_paths:
        path = os.path.join(folder_paths.models_dir, WEIGHTS_FOLDER)
        folder_paths.folder_names_and_paths[WEIGHTS_FOLDER] = ([path], {""})


def weights_folders() -> dict[str, str]:
    """Name -> folder of every LinFusion checkpoint folder (one holding config.json) under the model paths."""
    found: dict[str, str] = {}
    for root in folder_paths_module().get_folder_paths(WEIGHTS_FOLDER):
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            folder = os.path.join(root, name)
            if os.path.isfile(os.path.join(folder, "config.json")):
                found.setdefault(name, folder)
    return found


def load_layers(weights: str, signature: list[tuple[str, int, int]], download: bool) -> tuple[dict, str]:
    """The LinFusion layers by diffusers path, and where they came from."""
    local = weights_folders()
    if weights == AUTO:
        checkpoint = lf.checkpoint_for_layers(signature)
        if checkpoint is None:
            known = ", ".join(f"{c.repo_id} ({c.family})" for c in lf.known_checkpoints())
            raise LinFusionNodeError(
                f"no published LinFusion weights fit this UNet ({len(signature)} self-attention layers do not "
                f"match SD-1.x, SD-2.x or SD-XL; known: {known}). Put weights for it under "
                f"models/{WEIGHTS_FOLDER}/ and pick them by name."
            )
        name = checkpoint.repo_id.split("/")[-1]
        source = local.get(name, checkpoint.repo_id)
        local_only = source != checkpoint.repo_id or not download
    elif weights in local:
        source, local_only = local[weights], True
    else:
        raise LinFusionNodeError(
            f"no LinFusion weights named {weights!r} under models/{WEIGHTS_FOLDER}/ (found: "
            f"{', '.join(local) or 'none'})."
        )
    try:
        linfusion = lf.load_weights(source, local_only=local_only)
    except lf.CheckpointError as error:
        raise LinFusionNodeError(str(error).split("\n")[0]) from error
    return lf.layers_by_path(linfusion), str(source)


class LinFusionApply:
    """MODEL -> MODEL whose UNet self-attention (attn1) layers are LinFusion's linear attention."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ("MODEL",),
                "weights": ([AUTO, *weights_folders()],),
                "download": ("BOOLEAN", {"default": True}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Replaces every UNet self-attention with LinFusion's linear attention (memory and time linear in "
        "the pixels). 'auto' picks the published weights by the UNet's architecture: a folder of that name "
        "under models/linfusion/ (LinFusion-1-5, LinFusion-2-1, LinFusion-XL), else the Hub when 'download'."
    )

    def apply(self, model: Any, weights: str, download: bool = True) -> tuple[Any]:
        paths = attn1_paths(model)
        refuse_attn1_patches(model)
        signature = attn1_signature(model, paths)
        layers, source = load_layers(weights, signature, download)
        shapes = {path: lf.layer_width_and_heads(layer) for path, layer in layers.items()}
        check_layers_fit(signature, shapes, source)
        heads = {path: shape[1] for path, shape in shapes.items()}
        return (patched_clone(model, paths, layers, heads),)


def vae_options(store_limit_mb: int, band_mb: int, store_on: str, device_store_mb: int) -> dict[str, Any]:
    """The exact tiler's options from the node's inputs (0 MiB store limit: no limit)."""
    if band_mb <= 0:
        raise LinFusionNodeError(f"band_mb must be positive; got {band_mb}.")
    if store_on not in STORE_PLACES:
        raise LinFusionNodeError(f"store_on must be one of {STORE_PLACES}; got {store_on!r}.")
    return {
        "band_bytes": band_mb * MIB,
        "store_limit_bytes": store_limit_mb * MIB if store_limit_mb > 0 else None,
        "store_device": "cpu" if store_on == "cpu" else None,
        "device_store_bytes": max(0, device_store_mb) * MIB,
    }


def vae_inputs() -> dict[str, Any]:
    return {
        "store_limit_mb": ("INT", {"default": 0, "min": 0, "max": 2**24, "step": 64,
                                   "tooltip": "most the store of activations may hold; 0 = no limit"}),
        "band_mb": ("INT", {"default": 256, "min": 1, "max": 2**16, "step": 16,
                            "tooltip": "working memory of one pass's row chunks on the VAE's device"}),
        "vae_attention": (list(lf.VAE_ATTENTION_MODES), {"default": "exact"}),
        "store_on": (list(STORE_PLACES), {"default": "vae device"}),
        "device_store_mb": ("INT", {"default": 0, "min": 0, "max": 2**24, "step": 64,
                                    "tooltip": "with the store on cpu: how much of it may stay on the VAE's device"}),
    }  # fmt: skip


def run_tiler(
    call: Any, vae: Any, tensor: torch.Tensor, attention: str, options: dict[str, Any]
) -> torch.Tensor:
    """Run the exact tiler, turning a budget below the smallest workable store into a one-line error."""
    try:
        return call(vae, tensor, attention, **options)
    except lf.BudgetError as error:
        raise LinFusionNodeError(
            f"store_limit_mb {options['store_limit_bytes'] // MIB} is below the smallest store that works at "
            f"this size: {-(-error.minimum // MIB)} MiB. Raise store_limit_mb to at least that (0 = no limit)."
        ) from error


class LinFusionVAEDecode:
    """LATENT -> IMAGE with the exact tiled VAE: equal to the untiled decode, no seams, bounded memory."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",), **vae_inputs()}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, samples: dict, vae: Any, store_limit_mb: int = 0, band_mb: int = 256,
               vae_attention: str = "exact", store_on: str = "vae device", device_store_mb: int = 0) -> tuple:  # fmt: skip
        latents = samples["samples"]
        options = vae_options(store_limit_mb, band_mb, store_on, device_store_mb)
        model = diffusers_vae(vae)
        expected = model.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != expected:
            raise LinFusionNodeError(
                f"this VAE decodes latents of {expected} channels (B, {expected}, H, W); got a latent of shape "
                f"{tuple(latents.shape)} (from a model of another family?)."
            )
        latents = latents.to(device=vae.device, dtype=vae.vae_dtype)
        pixels = run_tiler(lf.decode, model, latents, vae_attention, options)
        images = vae.process_output(pixels.float())
        return (images.movedim(1, -1).to(output_device()),)


class LinFusionVAEEncode:
    """IMAGE -> LATENT (the latent distribution's mean) with the exact tiled VAE encoder."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",), **vae_inputs()}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, pixels: torch.Tensor, vae: Any, store_limit_mb: int = 0, band_mb: int = 256,
               vae_attention: str = "exact", store_on: str = "vae device", device_store_mb: int = 0) -> tuple:  # fmt: skip
        options = vae_options(store_limit_mb, band_mb, store_on, device_store_mb)
        model = diffusers_vae(vae)
        channels = model.config.in_channels
        if pixels.ndim != 4 or pixels.shape[-1] < channels:
            raise LinFusionNodeError(
                f"this VAE encodes images of {channels} channels (B, H, W, {channels}); got an image of shape "
                f"{tuple(pixels.shape)}."
            )
        pixels = vae.vae_encode_crop_pixels(pixels)[..., :channels].movedim(-1, 1).contiguous()
        images = vae.process_input(pixels).to(device=vae.device, dtype=vae.vae_dtype)
        moments = run_tiler(lf.encode_moments, model, images, vae_attention, options)
        mean = moments[:, : model.config.latent_channels]
        return ({"samples": mean.float().to(output_device())},)


class LinFusionVAEPlan:
    """Says, without running anything, whether a size fits a memory budget with the exact tiled VAE."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {
            "required": {
                "width": ("INT", {"default": 16384, "min": 8, "max": 2**17, "step": 8}),
                "height": ("INT", {"default": 16384, "min": 8, "max": 2**17, "step": 8}),
                "direction": (["decode", "encode"],),
                "dtype": (["float16", "bfloat16", "float32"],),
                **vae_inputs(),
            },
            "optional": {"vae": ("VAE",)},
        }

    RETURN_TYPES = ("STRING", "INT")
    RETURN_NAMES = ("report", "smallest_store_mb")
    FUNCTION = "plan"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def plan(self, width: int, height: int, direction: str = "decode", dtype: str = "float16",
             store_limit_mb: int = 0, band_mb: int = 256, vae_attention: str = "exact",
             store_on: str = "vae device", device_store_mb: int = 0, vae: Any = None) -> dict:  # fmt: skip
        report, smallest = plan_report(width, height, direction, dtype, store_limit_mb, band_mb,
                                       vae_attention, store_on, device_store_mb, vae)  # fmt: skip
        return {"ui": {"text": [report]}, "result": (report, smallest)}


def plan_report(width: int, height: int, direction: str, dtype: str, store_limit_mb: int, band_mb: int,
                vae_attention: str, store_on: str, device_store_mb: int, vae: Any = None) -> tuple[str, int]:  # fmt: skip
    """One line on whether the tiled VAE fits, its peaks, and the smallest store that works at that size."""
    if width % 8 or height % 8 or width <= 0 or height <= 0:
        raise LinFusionNodeError(f"width and height must be positive multiples of 8; got {width}x{height}.")
    options = vae_options(store_limit_mb, band_mb, store_on, device_store_mb)
    config = diffusers_vae(vae).config if vae is not None else lf.DEFAULT_VAE_CONFIG
    common = {
        "dtype": getattr(torch, dtype),
        "band_bytes": options["band_bytes"],
        "encode": direction == "encode",
        "device_store_bytes": None if options["store_device"] is None else options["device_store_bytes"],
        "attention": vae_attention,
    }
    try:
        smallest_cost = lf.vae_cost(dict(config), width, height, store_limit_bytes=0, **common)
        smallest = smallest_cost.store_peak
    except lf.BudgetError as error:
        smallest = error.minimum
    smallest_mb = -(-smallest // MIB)
    size = f"{direction} {width}x{height} ({dtype}, {vae_attention} attention)"
    try:
        cost = lf.vae_cost(
            dict(config), width, height, store_limit_bytes=options["store_limit_bytes"], **common
        )
    except lf.BudgetError:
        return (f"does not fit: {size} needs store_limit_mb >= {smallest_mb}; "
                f"{store_limit_mb} is too small.", smallest_mb)  # fmt: skip
    return (
        f"fits: {size}: VAE device peak {cost.device_peak / MIB:,.0f} MiB, host {cost.host_peak / MIB:,.0f} MiB, "
        f"store {cost.store_peak / MIB:,.0f} MiB, {cost.passes} passes, {cost.overhead:.2f}x the untiled "
        f"FLOPs; smallest store that works: {smallest_mb} MiB.",
        smallest_mb,
    )


def output_device() -> torch.device:
    """Where ComfyUI keeps images and latents between nodes."""
    import comfy.model_management

    return comfy.model_management.intermediate_device()


NODE_CLASS_MAPPINGS = {
    "LinFusionApply": LinFusionApply,
    "LinFusionVAEDecode": LinFusionVAEDecode,
    "LinFusionVAEEncode": LinFusionVAEEncode,
    "LinFusionVAEPlan": LinFusionVAEPlan,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LinFusionApply": "Apply LinFusion (linear attention)",
    "LinFusionVAEDecode": "VAE Decode (LinFusion exact tiled)",
    "LinFusionVAEEncode": "VAE Encode (LinFusion exact tiled)",
    "LinFusionVAEPlan": "Plan the exact tiled VAE (memory)",
}
