"""DemoFusion stages: the dilation identity, blur, cosine weights, skip residual noise, restoration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from linfusion import LinFusion
from linfusion.patches.dilation import apply_dilated_branch
from linfusion.pipelines import demofusion
from linfusion.pipelines.demofusion import match_channel_statistics, stage_scale
from linfusion.pipelines.latents import encode_image
from linfusion.testing import tiny_pipeline


def _convolution_settings(model: nn.Module) -> list[tuple]:
    return [(m.dilation, m.padding) for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_dilation_and_padding_restored_when_the_unet_raises() -> None:
    pipe = tiny_pipeline("sd15")
    unet = pipe.unet
    before = _convolution_settings(unet)

    def fail_when_dilated(module: nn.Module, args: tuple) -> None:
        if module.dilation != (1, 1):
            raise RuntimeError("boom in the dilated pass")

    handle = unet.conv_out.register_forward_pre_hook(fail_when_dilated)
    try:
        with pytest.raises(RuntimeError, match="boom in the dilated pass"):
            demofusion(
                pipe,
                "a red circle",
                64,
                64,
                num_inference_steps=3,
                generator=torch.Generator().manual_seed(0),
            )
    finally:
        handle.remove()
    assert _convolution_settings(unet) == before
    assert not unet._forward_hooks and not unet._forward_pre_hooks  # the branch's hooks are gone too


def test_stage_scale() -> None:
    assert stage_scale((2048, 1024), (512, 256)) == 4
    assert stage_scale((600, 400), (512, 344)) == 1


def test_channel_statistics_match_the_anchor() -> None:
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 32, 24) * 3 + 1
    anchor = torch.randn(1, 4, 8, 8) * torch.tensor([0.5, 1, 2, 4]).view(1, 4, 1, 1) - 2
    out = match_channel_statistics(latents, anchor)
    torch.testing.assert_close(out.mean(dim=(-2, -1)), anchor.mean(dim=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(-2, -1)), anchor.std(dim=(-2, -1)), atol=1e-5, rtol=1e-5)


def test_skip_residual_uses_the_noise_of_the_stage_start() -> None:
    """The latent each stage starts from is z0 noised with exactly the noise the skip residual uses: the
    first UNet input of the enlargement stage equals add_noise(z0, noise, t0) computed independently."""
    pipe = tiny_pipeline("sd15")
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    inputs: list[torch.Tensor] = []
    handle = pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    seed = 3
    try:
        demofusion(
            pipe, "a blue square", 64, 64, image=image, num_inference_steps=4, guidance_scale=1.0,
            strengths=[0.5], generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
    finally:
        handle.remove()
    z0 = encode_image(pipe, image.resize((64, 64), Image.Resampling.LANCZOS))
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    scheduler = pipe.scheduler
    t0 = scheduler.timesteps[len(scheduler.timesteps) - 2]  # strength 0.5 of 4 steps: the last two
    expected = scheduler.add_noise(z0, noise, t0.reshape(1))
    torch.testing.assert_close(inputs[0], expected, rtol=0, atol=1e-6)
    assert len(inputs) == 4  # two steps, each a plain and a dilated pass


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_demofusion_chain_sizes_stages_and_callback(family: str, tmp_path: Path) -> None:
    pipe = tiny_pipeline(family)
    LinFusion.construct_for(pipe, load_pretrained=False, init="teacher")
    calls: list[tuple[int, int]] = []
    unet_calls: list[tuple[int, ...]] = []
    conv_in = pipe.unet.conv_in  # runs once per UNet pass, the dilated one included
    handle = conv_in.register_forward_pre_hook(lambda module, args: unet_calls.append(tuple(args[0].shape)))

    def count(pipeline, step, timestep, tensors):
        calls.append((step, tensors["latents"].shape[-1]))
        return tensors

    try:
        image = demofusion(
            pipe, "a red circle", 128, 64, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
            save_stages=tmp_path, callback_on_step_end=count, exact_vae_tiling_from=64 * 64,
        )  # fmt: skip
    finally:
        handle.remove()
    assert image.size == (128, 64)
    pixels = np.asarray(image).astype(float)
    assert np.isfinite(pixels).all() and pixels.std() > 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "stage-1-32x16.png",
        "stage-2-64x32.png",
        "stage-3-128x64.png",
    ]
    widths = [width for _, width in calls]
    assert widths.count(16) == 4  # base: 4 steps on a 16-px latent (the tiny VAE downsamples 2x)
    assert widths.count(32) >= 1 and widths.count(64) >= 1  # each enlargement stage reports its steps
    # Enlargement stages call the UNet twice per step (plain and dilated), the base once.
    base_calls = sum(1 for shape in unet_calls if shape[-1] == 16)
    stage_calls = [shape for shape in unet_calls if shape[-1] != 16]
    assert base_calls == 4 and len(stage_calls) == 2 * (widths.count(32) + widths.count(64))
    assert pipe.unet.conv_in.dilation == (1, 1)


def test_demofusion_changes_the_sdedit_stage_and_scale_one_leaves_the_unet_alone() -> None:
    from linfusion.pipelines import sdedit

    pipe = tiny_pipeline("sd15")
    image = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))
    kwargs = dict(num_inference_steps=4, guidance_scale=1.0, strengths=[0.5], image=image)
    plain = sdedit(pipe, "x", 64, 64, generator=torch.Generator().manual_seed(0), **kwargs)
    steered = demofusion(pipe, "x", 64, 64, generator=torch.Generator().manual_seed(0), **kwargs)
    difference = np.abs(np.asarray(plain).astype(float) - np.asarray(steered).astype(float))
    assert difference.mean() > 0.5
    with apply_dilated_branch(pipe.unet, 1):  # scale 1: branch (b) is off, the UNet is unchanged
        sample = torch.randn(1, 4, 8, 8)
        hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
        once = pipe.unet(sample, 500, hidden).sample
    torch.testing.assert_close(once, pipe.unet(sample, 500, hidden).sample)
