"""LinFusionApply on ComfyUI models: equal to diffusers + LinFusion, reversible, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from tiny_nodes import tiny_models

from conftest import save_tiny_linfusion


@pytest.fixture(scope="module")
def unet():
    return tiny_models.diffusers_unet()


@pytest.fixture
def model(unet):
    return tiny_models.comfy_model(unet)


def inputs(batch: int = 2, size: int = 16):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, size, size, generator=generator)
    t = torch.tensor([700.0, 300.0][:batch])
    context = torch.randn(batch, 7, tiny_models.CONTEXT_DIM, generator=generator)
    return x, t, context


@torch.no_grad()
def run(model_patcher, patched: bool = False, transformer_options: dict | None = None) -> torch.Tensor:
    """The UNet's output as ComfyUI computes it (object patches applied while ``patched``)."""
    x, t, context = inputs()
    if patched:
        model_patcher.patch_model()
    try:
        return model_patcher.model.diffusion_model(
            x, timesteps=t, context=context, transformer_options=transformer_options or {}
        )
    finally:
        if patched:
            model_patcher.unpatch_model()


def weights_folder(name: str):
    from comfy.cmd import folder_paths

    return f"{folder_paths.get_folder_paths('linfusion')[0]}/{name}"


def test_patched_unet_equals_diffusers_with_linfusion(pack, tiny_weights, unet, model):
    from linfusion import LinFusion

    before = run(model)
    (patched,) = pack.nodes.LinFusionApply().apply(model, tiny_weights, False)
    out = run(patched, patched=True)

    x, t, context = inputs()
    reference_unet = tiny_models.diffusers_unet()
    LinFusion.from_pretrained(weights_folder(tiny_weights)).mount(reference_unet)
    with torch.no_grad():
        expected = reference_unet(x, t, context).sample
    relative = ((out - expected).abs().max() / expected.abs().max()).item()
    assert relative < 1e-5, relative
    assert (out - before).abs().max() > 1e-3  # the patch changed what the UNet computes

    # Every attn1 of the model is patched, and the input model was not touched.
    assert sorted(patched.object_patches) == sorted(pack.unet_patch.attn1_paths(model).values())
    assert model.object_patches == {}
    assert torch.equal(run(model), before)


def test_unpatch_restores_bit_identical_outputs(pack, tiny_weights, model):
    before = run(model)
    (patched,) = pack.nodes.LinFusionApply().apply(model, tiny_weights, False)
    run(patched, patched=True)
    assert torch.equal(run(model), before)
    assert not any(type(m).__name__ == "ComfyAttn1" for m in model.model.modules())


def test_a_second_apply_sees_through_a_patched_model(pack, tiny_weights, model):
    """ComfyUI leaves the last model it ran patched; applying again must still find the attn1 layers."""
    (patched,) = pack.nodes.LinFusionApply().apply(model, tiny_weights, False)
    patched.patch_model()
    try:
        (again,) = pack.nodes.LinFusionApply().apply(model, tiny_weights, False)
    finally:
        patched.unpatch_model()
    assert torch.allclose(run(again, patched=True), run(patched, patched=True), rtol=0, atol=0)


def test_attn1_replace_patch_is_refused(pack, tiny_weights, model):
    """With an attn1 replace patch ComfyUI computes q, k, v itself and never calls the patched module."""
    replaced = model.clone()
    replaced.set_model_attn1_replace(lambda q, k, v, extra: v, "input", 1)
    with pytest.raises(ValueError, match="replaced attn1 on 1 block") as error:
        pack.nodes.LinFusionApply().apply(replaced, tiny_weights, False)
    assert "\n" not in str(error.value)

    # A replace patch added after LinFusionApply: ComfyUI would bypass LinFusion's layer; it is refused.
    (patched,) = pack.nodes.LinFusionApply().apply(model, tiny_weights, False)
    options = {"patches_replace": {"attn1": {("input", 1): lambda q, k, v, extra: v}}}
    with pytest.raises(ValueError, match="replaced attn1 at diffusion_model.input_blocks.1.1"):
        run(patched, patched=True, transformer_options=options)
    assert model.object_patches == {}


def test_attn1_patch_is_refused(pack, tiny_weights, model):
    patched = model.clone()
    patched.set_model_attn1_patch(lambda n, context, value, extra: (n, context, value))
    with pytest.raises(ValueError, match="attn1 patch"):
        pack.nodes.LinFusionApply().apply(patched, tiny_weights, False)


def test_weights_that_do_not_fit_are_refused(pack, model, base_dir):
    from linfusion.testing import tiny_unet

    save_tiny_linfusion(base_dir / "models" / "linfusion" / "other-unet", tiny_unet("sd15"))
    before = run(model)
    with pytest.raises(ValueError, match="do not fit this model") as error:
        pack.nodes.LinFusionApply().apply(model, "other-unet", False)
    assert "\n" not in str(error.value)
    assert model.object_patches == {} and torch.equal(run(model), before)


def test_missing_weights_are_refused(pack, model):
    with pytest.raises(ValueError, match="no LinFusion weights named 'nowhere'"):
        pack.nodes.LinFusionApply().apply(model, "nowhere", False)


def test_auto_refuses_an_unknown_architecture(pack, model):
    with pytest.raises(ValueError, match="no published LinFusion weights fit this UNet"):
        pack.nodes.LinFusionApply().apply(model, "auto", False)


def meta_comfy_model(family: str):
    """A full-size ComfyUI model of ``family`` on the meta device (structure only), as its loader detects it."""
    import comfy.model_detection
    import comfy.model_patcher

    from linfusion.registry import build_meta_unet

    model_config = comfy.model_detection.model_config_from_diffusers_unet(
        build_meta_unet(family).state_dict()
    )
    model = model_config.get_model({}, device=torch.device("meta"))
    return comfy.model_patcher.ModelPatcher(model, load_device="cpu", offload_device="cpu"), model_config


@pytest.mark.parametrize(
    "family, repo_id, comfy_class",
    [("sd15", "Yuanshi/LinFusion-1-5", "SD15"), ("sd21", "Yuanshi/LinFusion-2-1", "SD20"),
     ("sdxl", "Yuanshi/LinFusion-XL", "SDXL")],
)  # fmt: skip
def test_auto_picks_the_published_weights_by_architecture(pack, family, repo_id, comfy_class):
    model, model_config = meta_comfy_model(family)
    assert type(model_config).__name__ == comfy_class  # how ComfyUI detects the checkpoint
    paths = pack.unet_patch.attn1_paths(model)
    checkpoint = pack.linfusion_calls.checkpoint_for_layers(pack.unet_patch.attn1_signature(model, paths))
    assert checkpoint is not None and checkpoint.repo_id == repo_id
    # Offline and without a local folder, auto says where to put the weights.
    with pytest.raises(ValueError, match=repo_id.split("/")[1]):
        pack.nodes.LinFusionApply().apply(model, "auto", False)


def test_other_model_types_are_refused(pack):
    import comfy.model_patcher
    import comfy.supported_models

    class TransformerModel(torch.nn.Module):
        model_config = comfy.supported_models.SD3({"in_channels": 16})

    model = comfy.model_patcher.ModelPatcher(TransformerModel(), load_device="cpu", offload_device="cpu")
    with pytest.raises(ValueError, match=r"SD-1.x, SD-2.x and SD-XL UNets; this model \(SD3\)"):
        pack.nodes.LinFusionApply().apply(model, "auto", False)
