"""LinFusion on real diffusers pipelines (tiny random weights): generate, unmount, save/load, ControlNet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from diffusers.models.attention_processor import Attention

from linfusion import GeneralizedLinearAttention, LinFusion
from linfusion.testing import tiny_components, tiny_pipeline
from support import random_image, run, write_published_folder


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
@pytest.mark.parametrize("task", ["text2img", "img2img", "inpaint"])
def test_generate_with_linfusion_then_unmount_restores_bit_identical_outputs(family: str, task: str) -> None:
    pipe = tiny_pipeline(family, task)
    original = run(pipe, task)
    linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
    linear = run(pipe, task)
    assert linear.shape == original.shape == (1, 32, 32, 3)
    assert np.isfinite(linear).all() and linear.std() > 0.01
    assert np.abs(linear - original).max() > 1e-3  # the attention really changed
    linfusion.unmount()
    assert np.array_equal(run(pipe, task), original)


def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    pipe = tiny_pipeline("sd15")
    linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
    expected = run(pipe)
    linfusion.save_pretrained(tmp_path / "linfusion")
    linfusion.unmount()

    fresh = tiny_pipeline("sd15")
    LinFusion.construct_for(fresh, pretrained_model_name_or_path=tmp_path / "linfusion")
    assert np.array_equal(run(fresh), expected)


def test_user_flow_from_saved_folders(tmp_path: Path) -> None:
    """The README flow: load a pipeline folder, construct_for(pipe, folder), generate, unmount, generate."""
    tiny_pipeline("sd15").save_pretrained(tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    write_published_folder(tmp_path / "linfusion", pipe.unet)
    original = run(pipe)

    linfusion = LinFusion.construct_for(pipe, pretrained_model_name_or_path=str(tmp_path / "linfusion"))
    assert all(
        isinstance(pipe.unet.get_submodule(p), GeneralizedLinearAttention) for p in linfusion.modules_dict
    )
    assert {p.dtype for p in linfusion.parameters()} == {torch.float32}  # fp16 file, placed like the UNet
    linear = run(pipe)
    assert np.isfinite(linear).all() and np.abs(linear - original).max() > 1e-3
    linfusion.unmount()
    assert np.array_equal(run(pipe), original)


def test_half_precision_pipeline_runs_finite() -> None:
    pipe = tiny_pipeline("sd15").to(torch.bfloat16)
    linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
    assert {p.dtype for p in linfusion.parameters()} == {torch.bfloat16}
    assert np.isfinite(run(pipe)).all()


# ---------------------------------------------------------------- ControlNet
def controlnet_pipeline() -> StableDiffusionControlNetPipeline:
    components = tiny_components("sd15")
    torch.manual_seed(3)
    controlnet = ControlNetModel.from_unet(components["unet"], conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():  # ControlNet zero-inits its outputs; randomize them so control changes the result
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            block.weight.normal_(0, 0.1)
        controlnet.controlnet_cond_embedding.conv_out.weight.normal_(0, 0.1)
    pipe = StableDiffusionControlNetPipeline(**components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def controlnet_attn1(pipe: StableDiffusionControlNetPipeline) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in pipe.controlnet.named_modules() if name.endswith("attn1")}


@pytest.mark.parametrize("on_controlnet", [False, True])
def test_controlnet_pipeline_with_linfusion(on_controlnet: bool) -> None:
    pipe = controlnet_pipeline()
    control = random_image(5)
    original = run(pipe, image=control)
    originals = controlnet_attn1(pipe)
    linfusion = LinFusion.construct_for(pipe, load_pretrained=False, controlnet=on_controlnet)

    mounted = controlnet_attn1(pipe)
    if on_controlnet:
        unet_layers = linfusion.modules_dict
        for path, layer in mounted.items():
            assert isinstance(layer, GeneralizedLinearAttention) and layer is not unet_layers[path]
            assert all(
                torch.equal(a, b)
                for a, b in zip(layer.state_dict().values(), unet_layers[path].state_dict().values())
            )
    else:
        assert all(type(layer) is Attention for layer in mounted.values())

    with_control = run(pipe, image=control)
    other_control = run(pipe, image=random_image(6))
    assert np.isfinite(with_control).all()
    assert np.abs(with_control - original).max() > 1e-3
    assert np.abs(with_control - other_control).max() > 1e-4  # the control image still steers the result

    linfusion.unmount()
    assert all(controlnet_attn1(pipe)[p] is m for p, m in originals.items())
    assert np.array_equal(run(pipe, image=control), original)


def test_controlnet_can_be_mounted_by_a_separate_call() -> None:
    pipe = controlnet_pipeline()
    linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
    linfusion.mount(pipe.controlnet)
    assert all(isinstance(m, GeneralizedLinearAttention) for m in controlnet_attn1(pipe).values())
    linfusion.unmount(pipe.controlnet)
    assert all(type(m) is Attention for m in controlnet_attn1(pipe).values())
    assert all(
        isinstance(pipe.unet.get_submodule(p), GeneralizedLinearAttention) for p in linfusion.modules_dict
    )
