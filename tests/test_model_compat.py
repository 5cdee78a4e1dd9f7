"""Compatibility with diffusers' attention-processor machinery, IP-Adapter and LoRA (PEFT)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.models.attention_processor import AttnProcessor

from linfusion import GeneralizedLinearAttention, LinFusion
from linfusion.testing import tiny_pipeline
from support import run


def linfusion_in_place(pipe, linfusion: LinFusion) -> bool:
    return all(pipe.unet.get_submodule(path) is layer for path, layer in linfusion.modules_dict.items())


def test_processor_calls_leave_linfusion_layers_alone() -> None:
    """diffusers rebuilds processors on many calls; attn1 is a LinFusion layer and ignores them."""
    pipe = tiny_pipeline("sd15")
    linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
    expected = run(pipe)
    assert not any("attn1" in name for name in pipe.unet.attn_processors)

    pipe.unet.set_default_attn_processor()
    assert linfusion_in_place(pipe, linfusion)
    assert np.allclose(run(pipe), expected, atol=1e-5)

    pipe.unet.set_attn_processor(AttnProcessor())
    pipe.unet.fuse_qkv_projections()
    assert linfusion_in_place(pipe, linfusion)
    assert np.allclose(run(pipe), expected, atol=1e-5)


def tiny_ip_adapter_state_dict(unet, image_embed_dim: int = 16, tokens: int = 4) -> dict:
    """An IP-Adapter checkpoint built in code, in the layout ``load_ip_adapter`` reads from a file.

    ``image_proj`` is diffusers' plain ``ImageProjection`` (a Linear to ``tokens`` context tokens and a
    LayerNorm); ``ip_adapter`` holds ``to_k_ip``/``to_v_ip`` for each cross-attention layer, numbered 1, 3,
    5, ... in ``attn_processors`` order, as the published IP-Adapter files are.
    """
    generator = torch.Generator().manual_seed(11)
    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(tokens * cross, image_embed_dim, generator=generator) * 0.2,
        "proj.bias": torch.zeros(tokens * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    layers = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        inner = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        layers[f"{key_id}.to_k_ip.weight"] = torch.randn(inner, cross, generator=generator) * 0.3
        layers[f"{key_id}.to_v_ip.weight"] = torch.randn(inner, cross, generator=generator) * 0.3
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": layers}


def test_ip_adapter_with_linfusion_mounted() -> None:
    pipe = tiny_pipeline("sd15")
    linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
    without_adapter = run(pipe)

    state = tiny_ip_adapter_state_dict(pipe.unet)
    pipe.load_ip_adapter(state, subfolder=None, weight_name=None, image_encoder_folder=None)
    assert linfusion_in_place(pipe, linfusion)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"IPAdapterAttnProcessor2_0"}

    embeds = [torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))]  # negative, positive
    pipe.set_ip_adapter_scale(1.0)
    with_image = run(pipe, ip_adapter_image_embeds=embeds)
    pipe.set_ip_adapter_scale(0.0)
    scale_zero = run(pipe, ip_adapter_image_embeds=embeds)
    assert np.abs(with_image - without_adapter).max() > 1e-3  # the adapter's attn2 processors are active
    assert np.allclose(scale_zero, without_adapter, atol=1e-5)

    pipe.unload_ip_adapter()
    assert linfusion_in_place(pipe, linfusion)
    assert np.array_equal(run(pipe), without_adapter)


def tiny_lora_state_dict(linfusion: LinFusion, rank: int = 4) -> dict[str, torch.Tensor]:
    """A PEFT-format LoRA for every attn1 projection, keyed by UNet path as LoRA files are."""
    generator = torch.Generator().manual_seed(2)
    state = {}
    for path, layer in linfusion.modules_dict.items():
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            linear = layer.get_submodule(projection)
            state[f"unet.{path}.{projection}.lora_A.weight"] = (
                torch.randn(rank, linear.in_features, generator=generator) * 0.3
            )
            state[f"unet.{path}.{projection}.lora_B.weight"] = (
                torch.randn(linear.out_features, rank, generator=generator) * 0.3
            )
    return state


def test_lora_targets_linfusion_projections_and_unloads_cleanly() -> None:
    pipe = tiny_pipeline("sd15")
    linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
    expected = run(pipe)

    pipe.load_lora_weights(tiny_lora_state_dict(linfusion), adapter_name="style")
    first = next(iter(linfusion.modules_dict.values()))
    assert type(first.to_q).__module__.startswith("peft")
    with_lora = run(pipe)
    assert np.abs(with_lora - expected).max() > 1e-3

    pipe.unload_lora_weights()
    assert type(first.to_q) is torch.nn.Linear and isinstance(first, GeneralizedLinearAttention)
    assert np.array_equal(run(pipe), expected)


def lora_on_attn1_and_attn2(linfusion: LinFusion, pipe) -> dict[str, torch.Tensor]:
    """The attn1 LoRA of :func:`tiny_lora_state_dict` plus one on every cross-attention's ``to_q``."""
    state = tiny_lora_state_dict(linfusion)
    generator = torch.Generator().manual_seed(3)
    for path in linfusion.modules_dict:
        linear = pipe.unet.get_submodule(path.replace("attn1", "attn2")).to_q
        state[f"unet.{path.replace('attn1', 'attn2')}.to_q.lora_A.weight"] = (
            torch.randn(4, linear.in_features, generator=generator) * 0.3
        )
        state[f"unet.{path.replace('attn1', 'attn2')}.to_q.lora_B.weight"] = (
            torch.randn(linear.out_features, 4, generator=generator) * 0.3
        )
    return state


def test_unmount_takes_the_lora_off_linfusion_layers_so_a_remount_starts_clean() -> None:
    """Mount, load a LoRA, unmount, unload it, mount again: LinFusion without the LoRA, bit for bit."""
    pipe = tiny_pipeline("sd15")
    linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
    mounted = run(pipe)
    linfusion.unmount()
    original = run(pipe)

    linfusion.mount(pipe)
    pipe.load_lora_weights(lora_on_attn1_and_attn2(linfusion, pipe), adapter_name="style")
    with_lora = run(pipe)
    assert np.abs(with_lora - mounted).max() > 1e-3
    linfusion.unmount()
    layers = list(linfusion.modules_dict.values())
    assert all(type(layer.to_q) is torch.nn.Linear for layer in layers)  # the attn1 LoRA went with the mount
    first_cross = pipe.unet.get_submodule(next(iter(linfusion.modules_dict)).replace("attn1", "attn2"))
    assert type(first_cross.to_q).__module__.startswith("peft")  # the rest of the LoRA stays on the UNet
    pipe.unload_lora_weights()
    assert np.array_equal(run(pipe), original)

    linfusion.mount(pipe)
    assert np.array_equal(run(pipe), mounted)  # no LoRA came back with the layers


def test_a_fused_lora_is_unfused_when_the_mount_is_removed() -> None:
    pipe = tiny_pipeline("sd15")
    linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
    mounted = run(pipe)
    pipe.load_lora_weights(tiny_lora_state_dict(linfusion), adapter_name="style")
    pipe.fuse_lora()
    assert np.abs(run(pipe) - mounted).max() > 1e-3
    linfusion.unmount()
    pipe.unload_lora_weights()
    linfusion.mount(pipe)
    assert np.allclose(run(pipe), mounted, atol=1e-6)  # unfusing subtracts what fusing added
