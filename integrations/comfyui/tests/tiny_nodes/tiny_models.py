"""Tiny SD-1.5-shaped models built through ComfyUI's own classes, with their diffusers twins.

ComfyUI's checkpoint loader recognises SD-1.5 only at full width, so the tests build the model the way
the loader would after detection: ``comfy.supported_models.SD15(unet_config).get_model(...)``, with the
weights of a seeded diffusers ``UNet2DConditionModel`` converted by ``comfy.utils.unet_to_diffusers``.
ComfyUI's GroupNorms have 32 groups, so the tiny widths are 32 and 64. Import this after
``comfy.cli_args.args.cpu`` is set (see :func:`use_cpu`).
"""

from __future__ import annotations

from typing import Any

import torch

CONTEXT_DIM = 32
UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 0],
    "transformer_depth_output": [1, 1, 0, 0],  # read from the end: the deepest level's output blocks first
    "transformer_depth_middle": 1,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
    "adm_in_channels": None,
    "context_dim": CONTEXT_DIM,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
VAE_DDCONFIG: dict[str, Any] = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 2, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
TEXT_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": CONTEXT_DIM,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": CONTEXT_DIM,
    "vocab_size": 49408,
}


def use_cpu() -> None:
    """ComfyUI imported in-process ignores ``--cpu`` on the command line: set it before model_management."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def diffusers_unet(seed: int = 0) -> Any:
    """The diffusers twin of the tiny ComfyUI UNet (attention at the first level and in the middle)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=CONTEXT_DIM,
    ).eval()


def comfy_model(unet: Any) -> Any:
    """A ComfyUI ``ModelPatcher`` around an SD-1.5 ``BaseModel`` holding ``unet``'s weights."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    model_config = comfy.supported_models.SD15(UNET_CONFIG)
    mapping = comfy.utils.unet_to_diffusers(model_config.unet_config)
    state_dict = unet.state_dict()
    converted = {mapping[key]: value.clone() for key, value in state_dict.items() if key in mapping}
    model = model_config.get_model({})
    missing, unexpected = model.diffusion_model.load_state_dict(converted, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    model.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def diffusers_vae(seed: int = 0) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),  # four levels: 8x like SD's VAE (ComfyUI assumes 8x)
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=32,
        layers_per_block=1,
        sample_size=32,
    ).eval()


def comfy_vae(vae: Any) -> Any:
    """A ComfyUI ``VAE`` with ``vae``'s weights (ComfyUI converts the diffusers keys itself)."""
    import comfy.sd

    state_dict = {key: value.clone() for key, value in vae.state_dict().items()}
    return comfy.sd.VAE(sd=state_dict, config={"params": {"ddconfig": dict(VAE_DDCONFIG), "embed_dim": 4}})


def comfy_clip(seed: int = 0) -> Any:
    """A ComfyUI ``CLIP`` with a two-layer, 32-wide CLIP-L text model (ComfyUI's own tokenizer files)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # ComfyUI builds models without autograd (it sets weights in place)
        clip = comfy.sd.CLIP(target, textmodel_json_config=dict(TEXT_CONFIG))
        for parameter in clip.cond_stage_model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return clip


def tiny_checkpoint(seed: int = 0) -> tuple[Any, Any, Any]:
    """(MODEL, CLIP, VAE) as ComfyUI's checkpoint loader returns them."""
    return comfy_model(diffusers_unet(seed)), comfy_clip(seed), comfy_vae(diffusers_vae(seed))
