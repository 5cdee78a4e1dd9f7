"""PixArt text-to-image and refine steps against diffusers' own PixArt pipelines, the chain on a DiT."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from PIL import Image

from linfusion import LinFusion
from linfusion.pipelines import demofusion, dit, sdedit
from linfusion.pipelines.chain import minimum_side, native_long_side, stage_steps
from linfusion.testing import PIXART_FAMILIES, tiny_pipeline

NATIVE = {"pixart-sigma": 32, "pixart-alpha": 256}  # sample size x VAE factor 2


def reference_call(pipe: Any, size: int, seed: int, **options: Any) -> Any:
    """diffusers' own PixArt call, at an exact size."""
    return pipe(
        "a red circle", width=size, height=size, guidance_scale=3.0, generator=torch.Generator().manual_seed(seed),
        use_resolution_binning=False, clean_caption=False, **options,
    ).images  # fmt: skip


@pytest.mark.parametrize("family", PIXART_FAMILIES)
def test_text_to_image_is_the_pipelines_own_image(family: str) -> None:
    pipe = tiny_pipeline(family)
    LinFusion.construct_for(pipe, load_pretrained=False, init="teacher")
    size = 32
    expected = reference_call(pipe, size, 3, num_inference_steps=3, negative_prompt="blue")[0]
    ours = dit.text_to_image(
        pipe, "a red circle", size, size, negative_prompt="blue", num_inference_steps=3, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert ours.size == (size, size)
    assert np.array_equal(np.asarray(ours), np.asarray(expected))
    other_negative = dit.text_to_image(
        pipe, "a red circle", size, size, num_inference_steps=3, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert not np.array_equal(np.asarray(other_negative), np.asarray(ours))  # the negative prompt is used


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_refine_is_the_pipeline_started_from_the_noised_image(strength: float) -> None:
    """The refine step equals diffusers' PixArt loop from ``add_noise(z0, noise, t_start)`` over the tail
    of the schedule (at strength 1.0: the whole schedule, i.e. text-to-image from those latents)."""
    pipe = tiny_pipeline("pixart-sigma")
    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    ours = dit.refine_latents(
        pipe, z0, "a red circle", strength, num_inference_steps=6, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    pipe.scheduler.set_timesteps(6)
    tail = pipe.scheduler.timesteps[6 - int(6 * strength) :]
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    noised = pipe.scheduler.add_noise(z0, noise, tail[:1])
    schedule = {"num_inference_steps": 6} if strength == 1.0 else {"timesteps": tail.tolist()}
    expected = reference_call(pipe, 32, 2, latents=noised, output_type="latent", **schedule)
    assert len(tail) == int(6 * strength)
    assert torch.equal(ours, expected)


def test_refine_strength_must_be_in_range_and_run_a_step() -> None:
    pipe = tiny_pipeline("pixart-sigma")
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        dit.refine_latents(pipe, torch.zeros(1, 4, 16, 16), "x", 0.0)
    with pytest.raises(ValueError, match="strength 0.1 of 5 steps runs no step: ask for at least 10 steps"):
        dit.refine_latents(pipe, torch.zeros(1, 4, 16, 16), "x", 0.1, num_inference_steps=5)


def test_step_callbacks_see_the_steps_and_replace_the_latents() -> None:
    pipe = tiny_pipeline("pixart-sigma")
    seen: list[tuple[int, int]] = []

    def on_step_end(running: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        seen.append((index, running.num_timesteps))
        assert running.scheduler is pipe.scheduler  # the pipeline's own attributes
        if index + 1 == running.num_timesteps:
            return {"latents": torch.zeros_like(tensors["latents"])}
        return tensors

    image = dit.text_to_image(
        pipe, "a red circle", 32, 32, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
        callback_on_step_end=on_step_end,
    )  # fmt: skip
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert np.array_equal(np.asarray(image), np.asarray(dit.decode(pipe, torch.zeros(1, 4, 16, 16))))


def test_sizes_of_a_pixart_pipeline() -> None:
    for family in PIXART_FAMILIES:
        pipe = tiny_pipeline(family)
        assert native_long_side(pipe) == NATIVE[family]
        assert minimum_side(pipe) == 4  # one 2x2 patch of latents, 2 px each
    assert dit.max_sequence_length(tiny_pipeline("pixart-alpha")) == 120
    assert dit.max_sequence_length(tiny_pipeline("pixart-sigma")) == 300


def test_positional_embedding_at_twice_the_native_size_keeps_the_trained_interpolation_scale() -> None:
    """At 2x the transformer adds the sin-cos embedding of the 2x latent grid with base size
    sample_size / patch_size and the trained interpolation scale (the coordinate range of the native size)."""
    pipe = tiny_pipeline("pixart-sigma")
    embed = pipe.transformer.pos_embed
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = embed.register_forward_hook(lambda module, args, output: captured.append((args[0], output)))
    try:
        dit.image_to_image(
            pipe, Image.new("RGB", (64, 64), (200, 40, 40)), "a red circle", 0.5, num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    finally:
        handle.remove()
    latent, output = captured[0]
    assert latent.shape[-2:] == (32, 32)  # 64 px: twice the 16x16 latents of the native 32 px
    added = output - embed.proj(latent).flatten(2).transpose(1, 2)
    config = pipe.transformer.config
    trained_scale = config.interpolation_scale or max(config.sample_size // 64, 1)

    def sincos(scale: float) -> torch.Tensor:
        return get_2d_sincos_pos_embed(
            48, (16, 16), base_size=config.sample_size // config.patch_size, interpolation_scale=scale,
            output_type="pt",
        ).float()  # fmt: skip

    assert torch.allclose(added[0], sincos(trained_scale), atol=1e-5)
    assert not torch.allclose(added[0], sincos(2 * trained_scale), atol=1e-3)  # not scaled with the image


def test_sdedit_chain_on_pixart_is_text_to_image_then_refine() -> None:
    pipe = tiny_pipeline("pixart-sigma")
    LinFusion.construct_for(pipe, load_pretrained=False, init="teacher")
    ended: list[tuple[int, int]] = []
    image = sdedit(
        pipe, "a red circle", 64, 64, num_inference_steps=3, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(4), on_stage_end=lambda i, stage, picture: ended.append(picture.size),
    )  # fmt: skip
    assert ended == [(32, 32), (64, 64)] and image.size == (64, 64)
    generator = torch.Generator().manual_seed(4)
    options = {"guidance_scale": 3.0, "generator": generator}
    base = dit.text_to_image(pipe, "a red circle", 32, 32, num_inference_steps=3, **options)
    resized = base.resize((64, 64), Image.Resampling.LANCZOS)
    expected = dit.image_to_image(
        pipe, resized, "a red circle", 0.4, num_inference_steps=stage_steps(3, 0.4), **options
    )
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_demofusion_is_refused_on_a_dit_with_the_reason() -> None:
    with pytest.raises(ValueError, match="no convolution .* use --mode sdedit"):
        demofusion(tiny_pipeline("pixart-sigma"), "a red circle", 64, 64, num_inference_steps=2)


def test_the_prompt_is_encoded_where_the_text_encoder_is_and_moved_to_the_execution_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A text encoder kept on the CPU (off the offload hooks) encodes there; its states and mask are moved to
    the execution device, faked here as ``meta`` so that the move shows."""
    pipe = tiny_pipeline("pixart-sigma")
    on_cpu = dit.encode_conditioning(pipe, "a red circle", "blue", 3.0, 32, 32)
    seen: list[torch.device] = []
    pipe.text_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].device))
    monkeypatch.setattr(type(pipe), "_execution_device", property(lambda self: torch.device("meta")))
    assert dit.text_encoder_device(pipe) == torch.device("cpu")
    moved = dit.encode_conditioning(pipe, "a red circle", "blue", 3.0, 32, 32)
    assert seen == [torch.device("cpu")] * 2  # the prompt and the negative prompt, encoded on the CPU
    assert moved.embeds.device.type == "meta" and moved.mask.device.type == "meta"
    assert moved.embeds.shape == on_cpu.embeds.shape and moved.mask.shape == on_cpu.mask.shape
    assert moved.embeds.dtype == on_cpu.embeds.dtype
    # under accelerate's offload hooks the text encoder runs on the execution device, wherever it waits
    monkeypatch.setattr(pipe.text_encoder, "_hf_hook", object(), raising=False)
    assert dit.text_encoder_device(pipe) == torch.device("meta")


def test_a_float16_text_encoder_on_the_cpu_encodes_in_float32_and_is_given_back_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CPUs multiply float16 far slower than float32: the prompt kept on the CPU is encoded with the weights
    upcast (exact), the states come back in the encoder's float16, and the weights are the same bits after."""
    pipe = tiny_pipeline("pixart-sigma")
    reference = dit.encode_conditioning(pipe, "a red circle", "blue", 3.0, 32, 32)  # float32 weights
    pipe.text_encoder.to(torch.float16)
    before = {name: tensor.clone() for name, tensor in pipe.text_encoder.state_dict().items()}
    seen: list[torch.dtype] = []
    pipe.text_encoder.register_forward_pre_hook(
        lambda module, args: seen.append(next(module.parameters()).dtype)
    )
    monkeypatch.setattr(type(pipe), "_execution_device", property(lambda self: torch.device("meta")))
    moved = dit.encode_conditioning(pipe, "a red circle", "blue", 3.0, 32, 32)
    assert seen == [torch.float32] * 2 and moved.embeds.dtype == torch.float16
    after = pipe.text_encoder.state_dict()
    assert all(
        after[name].dtype == torch.float16 and torch.equal(after[name], t) for name, t in before.items()
    )
    # the same encode on the CPU, to compare values: float16-rounded weights, float32 arithmetic
    monkeypatch.undo()
    with dit.float32_while_on_cpu(pipe.text_encoder):
        upcast = dit.encode_conditioning(pipe, "a red circle", "blue", 3.0, 32, 32)
    assert torch.allclose(upcast.embeds, reference.embeds, rtol=1e-2, atol=1e-2)  # fp16 weight rounding only
    with dit.float32_while_on_cpu(pipe.text_encoder):
        assert all(t.dtype == torch.float32 for t in pipe.text_encoder.parameters())
    assert all(t.dtype == torch.float16 for t in pipe.text_encoder.parameters())
