"""LinFusion on diffusion transformers: PixArt-Alpha / PixArt-Sigma mount, save/load, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linfusion import LinFusion
from linfusion.model import NotAUNetError, denoiser_of
from linfusion.registry import (
    UnsupportedModelError,
    attention_signature,
    build_meta_transformer,
    check_linearizable,
)
from linfusion.testing import PIXART_FAMILIES, tiny_pipeline, tiny_transformer


def render(pipe, seed: int = 0) -> torch.Tensor:
    return pipe(
        "a red square",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        use_resolution_binning=False,
    ).images


def transformer_output(transformer, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 12, generator=generator)
    text = torch.randn(2, 5, transformer.config.caption_channels, generator=generator)
    added = {"resolution": torch.tensor([[64.0, 96.0]] * 2), "aspect_ratio": torch.tensor([[1.5]] * 2)}
    with torch.no_grad():
        return transformer(
            latents, encoder_hidden_states=text, timestep=torch.tensor([500, 500]), added_cond_kwargs=added
        ).sample


@pytest.mark.parametrize("family", PIXART_FAMILIES)
def test_mount_and_unmount_on_a_pixart_pipeline_are_bit_identical(family: str) -> None:
    pipe = tiny_pipeline(family)
    before = render(pipe)
    linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
    mounted = render(pipe)
    assert not torch.equal(mounted, before)  # the attention really changed
    linfusion.unmount()
    assert torch.equal(render(pipe), before)
    assert all(
        type(pipe.transformer.get_submodule(p)).__name__ == "Attention"
        for p, _, _ in attention_signature(pipe.transformer)
    )


@pytest.mark.parametrize("family", PIXART_FAMILIES)
def test_layer_matches_the_published_formula_on_a_pixart_block(family: str) -> None:
    """q = to_q(x + to_q_(x)) + b_q, k likewise, v = to_v(x); normalized elu+1 linear attention per head."""
    transformer = tiny_transformer(family)
    linfusion = LinFusion.from_transformer(transformer, init="random")
    path, layer = next(iter(linfusion.modules_dict.items()))
    assert layer.bias and path == "transformer_blocks.0.attn1"
    x = torch.randn(2, 24, layer.dim, dtype=torch.float64)
    layer = layer.double()
    q = (x + layer.to_q_(x)) @ layer.to_q.weight.T + layer.to_q.bias
    k = (x + layer.to_k_(x)) @ layer.to_k.weight.T + layer.to_k.bias
    v = x @ layer.to_v.weight.T + layer.to_v.bias
    heads = layer.heads

    def split(t):
        return t.view(2, 24, heads, -1).transpose(1, 2)

    phi_q, phi_k = F.elu(split(q)) + 1, F.elu(split(k)) + 1
    weights = phi_q @ phi_k.transpose(-1, -2)
    out = (weights @ split(v)) / (weights.sum(-1, keepdim=True) + 1e-4 * 24)
    out = out.transpose(1, 2).reshape(2, 24, layer.dim) @ layer.to_out[0].weight.T + layer.to_out[0].bias
    assert torch.allclose(layer(x), out, rtol=1e-9, atol=1e-10)


def test_teacher_init_reproduces_the_teachers_projections_with_biases() -> None:
    transformer = tiny_transformer("pixart-sigma")
    linfusion = LinFusion.from_transformer(transformer, init="teacher")
    layer = linfusion.modules_dict["transformer_blocks.1.attn1"]
    original = transformer.transformer_blocks[1].attn1
    for name in ("to_q", "to_k", "to_v"):
        assert torch.equal(getattr(layer, name).bias, getattr(original, name).bias)
        assert torch.equal(getattr(layer, name).weight, getattr(original, name).weight)
    x = torch.randn(1, 10, layer.dim)
    assert torch.count_nonzero(layer.to_q_(x)) == 0  # the MLP starts at zero: an identity residual


def test_save_and_load_round_trip_keeps_biases_and_output(tmp_path) -> None:
    transformer = tiny_transformer("pixart-alpha")
    linfusion = LinFusion.from_transformer(transformer)
    entries = linfusion.config.modules_list
    assert all(entry["bias"] is True for entry in entries)
    assert all(entry["projection_mid_dim"] == 48 // 16 for entry in entries)  # C/16 for transformers
    linfusion.save_pretrained(tmp_path / "lf")
    loaded = LinFusion.from_pretrained(tmp_path / "lf")
    with linfusion.mount(transformer):
        expected = transformer_output(transformer)
    with loaded.mount(transformer):
        assert torch.equal(transformer_output(transformer), expected)


def test_unet_checkpoints_keep_the_published_layout_without_a_bias_key() -> None:
    from linfusion.testing import tiny_unet

    entries = LinFusion.from_unet(tiny_unet("sd15")).config.modules_list
    assert entries and all("bias" not in entry for entry in entries)


def test_unet_weights_do_not_fit_a_transformer_and_say_why() -> None:
    from linfusion.model import LinFusionCheckpointError

    transformer = tiny_transformer("pixart-sigma")
    entries = [
        {"module_name": path, "dim_n": width, "heads": heads, "projection_mid_dim": None}
        for path, width, heads in attention_signature(transformer)
    ]
    with pytest.raises(LinFusionCheckpointError, match="biases"):
        LinFusion(entries).mount(transformer)
    from linfusion.testing import tiny_unet

    with pytest.raises(LinFusionCheckpointError, match="missing from the model"):
        LinFusion.from_unet(tiny_unet("sd15")).mount(transformer)


def test_no_published_weights_for_pixart_points_to_distillation() -> None:
    with pytest.raises(LookupError, match="linfusion distill"):
        LinFusion.construct_for(tiny_pipeline("pixart-sigma"))


def test_a_pixart_pipeline_without_its_transformer_is_refused_before_any_work() -> None:
    pipe = tiny_pipeline("pixart-sigma")
    pipe.transformer = None
    with pytest.raises(NotAUNetError, match="has no transformer"):
        LinFusion.construct_for(pipe, load_pretrained=False)
    with pytest.raises(NotAUNetError, match="pipe.transformer"):
        LinFusion.from_transformer(tiny_pipeline("pixart-sigma"))


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
    )


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )


def tiny_sana():
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,
        sample_size=8,
        patch_size=1,
    )


@pytest.mark.parametrize(
    "build, reason",
    [(tiny_sd3, "joint"), (tiny_flux, "joint"), (tiny_sana, "already linear")],
    ids=["sd3", "flux", "sana"],
)
def test_joint_and_already_linear_transformers_are_refused_with_the_reason(build, reason) -> None:
    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for attempt in (
        lambda: LinFusion.from_transformer(model),
        lambda: LinFusion.construct_for(transformer=model, load_pretrained=False),
        lambda: check_linearizable(model),
    ):
        with pytest.raises(UnsupportedModelError, match=reason) as error:
            attempt()
        assert "PixArtTransformer2DModel" in str(error.value)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_model_without_self_attention_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="no self-attention"):
        LinFusion.from_transformer(torch.nn.Linear(3, 3))


def test_denoiser_of_picks_unet_or_transformer() -> None:
    assert denoiser_of(tiny_pipeline("pixart-alpha")).__class__.__name__ == "PixArtTransformer2DModel"
    assert denoiser_of(tiny_pipeline("sd15")).__class__.__name__ == "UNet2DConditionModel"
    with pytest.raises(NotAUNetError, match="unet` or a\n?.*transformer|`transformer`"):
        denoiser_of(object())


@pytest.mark.parametrize("family", PIXART_FAMILIES)
def test_full_size_pixart_structure_on_meta(family: str) -> None:
    transformer = build_meta_transformer(family)
    signature = attention_signature(transformer)
    assert len(signature) == 28 and {(w, h) for _, w, h in signature} == {(1152, 16)}
    assert transformer.config.use_additional_conditions == (family == "pixart-alpha")
    config = LinFusion.default_config(transformer)["modules_list"]
    assert config[0] == {
        "module_name": "transformer_blocks.0.attn1",
        "dim_n": 1152,
        "heads": 16,
        "projection_mid_dim": 72,
        "bias": True,
    }
