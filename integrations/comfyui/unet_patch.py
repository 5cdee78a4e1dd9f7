"""LinFusion layers on a ComfyUI model: where its ``attn1`` modules are, and the object patches.

ComfyUI's UNet names its blocks the original (LDM) way (``input_blocks.1.1.transformer_blocks.0.attn1``);
LinFusion's checkpoints use diffusers' names (``down_blocks.0.attentions.0.transformer_blocks.0.attn1``).
``comfy.utils.unet_to_diffusers`` maps one to the other. The patch point is
``ModelPatcher.add_object_patch(path, module)`` on a clone: the module receives the block's hidden states
before the q/k/v projections, as LinFusion needs. ComfyUI's ``attn1`` replace patches hand over q, k, v
after the projections (and then never call the module), so they cannot be combined with LinFusion.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_QUERY_WEIGHT = ".to_q.weight"


class LinFusionNodeError(ValueError):
    """A request a LinFusion node cannot carry out; the message says what to change (one line)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class _ReplacedAttn1Output(nn.Sequential):
    """LinFusion's output projection under ComfyUI's name ``to_out``; ComfyUI calls it as a whole only when
    another node's attn1 replace patch took over the block (added after LinFusionApply): refuse then."""

    def __init__(self, path: str, *modules: nn.Module) -> None:
        super().__init__(*modules)
        self.path = path

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise LinFusionNodeError(
            f"another node replaced attn1 at {self.path} after LinFusionApply: ComfyUI then computes the "
            "attention itself and LinFusion's layer is not used. Apply LinFusion last, or leave that node out."
        )


class ComfyAttn1(nn.Module):
    """A LinFusion layer in the place of a ComfyUI ``attn1``.

    The layer's submodules are registered here under their own names (``to_q``, ``to_k_`` ...), so the
    patched model's state dict keeps ComfyUI's ``...attn1.to_q.weight`` keys and LoRA patches on them
    apply to LinFusion's projections, as diffusers' LoRA loading does with LinFusion mounted. ComfyUI calls
    ``attn1(x, context=..., value=..., mask=...)`` (newer versions add ``transformer_options=``): a
    self-attention receives ``context`` None or the same tokens; LinFusion attends over ``x`` itself.
    """

    def __init__(self, layer: nn.Module, path: str, heads: int) -> None:
        super().__init__()
        for name, child in layer.named_children():
            if name == "to_out":  # ComfyUI's attn1.to_out is a Sequential
                child = _ReplacedAttn1Output(path, *child)
            self.add_module(name, child)
        self.__dict__["layer"] = layer  # not registered: its children are already ours
        self.path = path
        self.heads = heads  # read like a ComfyUI CrossAttention's when the model is patched already

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        for name, given in (("context", context), ("value", value)):
            if given is not None and given.shape != x.shape:
                raise LinFusionNodeError(
                    f"LinFusion at {self.path}: another patch gives attn1 a {name} of shape "
                    f"{tuple(given.shape)} for hidden states of shape {tuple(x.shape)}; LinFusion attends "
                    "over the block's own tokens only. Remove that patch or LinFusionApply."
                )
        weight = self.to_q.weight
        if weight.device != x.device:  # ComfyUI moved the UNet without this module (low-VRAM modes)
            self.layer.to(x.device)
        out = self.layer(x.to(weight.dtype))
        return out.to(x.dtype)


def attn1_paths(model_patcher: Any) -> dict[str, str]:
    """diffusers ``attn1`` path -> the ComfyUI object-patch key (``diffusion_model.<path>``)."""
    import comfy.utils

    base_model = model_patcher.model
    config = getattr(getattr(base_model, "model_config", None), "unet_config", None) or {}
    kind = type(getattr(base_model, "model_config", base_model)).__name__
    mapping = comfy.utils.unet_to_diffusers(config) if "num_res_blocks" in config else {}
    paths = {
        key[: -len(_QUERY_WEIGHT)]: "diffusion_model." + value[: -len(_QUERY_WEIGHT)]
        for key, value in mapping.items()
        if key.endswith("attn1" + _QUERY_WEIGHT)
    }
    if not paths:
        raise LinFusionNodeError(
            f"LinFusion supports SD-1.x, SD-2.x and SD-XL UNets; this model ({kind}) has no UNet "
            "self-attention layers to replace (SD3, FLUX and other transformer models are not supported)."
        )
    return paths


def attn1_signature(model_patcher: Any, paths: dict[str, str]) -> list[tuple[str, int, int]]:
    """(diffusers path, width, heads) of every ``attn1`` of the model, as linfusion's registry lists them."""
    signature = []
    for diffusers_path, key in paths.items():
        module = original_module(model_patcher, key)
        to_q = getattr(module, "to_q", None)
        if to_q is None or not hasattr(module, "heads"):
            raise LinFusionNodeError(
                f"{key} is a {type(module).__name__}, not a ComfyUI self-attention layer."
            )
        if to_q.in_features != to_q.out_features:
            raise LinFusionNodeError(
                f"{key} has query width {to_q.in_features} but inner width {to_q.out_features}; "
                "LinFusion layers keep the width."
            )
        signature.append((diffusers_path, int(to_q.in_features), int(module.heads)))
    return signature


def original_module(model_patcher: Any, key: str) -> nn.Module:
    """The module at ``key`` in the model itself (object patches of clones are not applied there)."""
    module = model_patcher.model
    for name in key.split("."):
        module = getattr(module, name)
    return module


def refuse_attn1_patches(model_patcher: Any) -> None:
    """LinFusion cannot run where another node replaced or pre-processes ``attn1``: say which one."""
    options = model_patcher.model_options.get("transformer_options", {})
    replaced = options.get("patches_replace", {}).get("attn1", {})
    if replaced:
        blocks = ", ".join(str(block) for block in list(replaced)[:3])
        raise LinFusionNodeError(
            f"another node replaced attn1 on {len(replaced)} block(s) ({blocks}); ComfyUI then computes "
            "q, k, v itself and never calls LinFusion's layers. Apply LinFusion to the model before that "
            "node's patch is added, or leave that node out."
        )
    if options.get("patches", {}).get("attn1_patch"):
        raise LinFusionNodeError(
            "another node set an attn1 patch (it changes attn1's keys and values); LinFusion attends over "
            "the block's own tokens and would ignore it. Leave that node out with LinFusion."
        )


def check_layers_fit(
    expected: list[tuple[str, int, int]], layers: dict[str, tuple[int, int]], source: str
) -> None:
    """The checkpoint must have exactly the model's ``attn1`` layers, each of the same width and heads."""
    model_paths = {path for path, _, _ in expected}
    missing = sorted(model_paths - set(layers))
    extra = sorted(set(layers) - model_paths)
    if missing or extra:
        which = (
            f"the model's {missing[0]!r} has no layer in it"
            if missing
            else f"its {extra[0]!r} is not in the model"
        )
        raise LinFusionNodeError(
            f"the LinFusion weights {source!r} do not fit this model: {which} "
            f"({len(layers)} layers in the weights, {len(model_paths)} self-attention layers in the model). "
            "Pick the weights made for this base model (SD-1.x, SD-2.x or SD-XL)."
        )
    for path, width, heads in expected:
        if layers[path] != (width, heads):
            raise LinFusionNodeError(
                f"the LinFusion weights {source!r} do not fit this model: {path} has width {width} and "
                f"{heads} heads in the model but width {layers[path][0]} and {layers[path][1]} heads in the weights."
            )


def patched_clone(
    model_patcher: Any, paths: dict[str, str], layers: dict[str, nn.Module], heads: dict[str, int]
) -> Any:
    """A clone of the model whose ``attn1`` modules are the LinFusion layers (the input is not changed)."""
    reference = next(original_module(model_patcher, "diffusion_model").parameters())
    clone = model_patcher.clone()
    for diffusers_path, key in paths.items():
        layer = layers[diffusers_path].to(device=reference.device, dtype=reference.dtype).eval()
        clone.add_object_patch(key, ComfyAttn1(layer, key, heads[diffusers_path]))
    return clone
