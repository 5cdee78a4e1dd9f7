"""Bad input gives a clear error and leaves the UNet untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from linfusion import LinFusion, LinFusionCheckpointError
from linfusion.testing import tiny_pipeline, tiny_unet
from support import write_published_folder


def snapshot(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return dict(unet.named_modules())


def assert_untouched(unet: torch.nn.Module, before: dict[str, torch.nn.Module]) -> None:
    after = snapshot(unet)
    assert after.keys() == before.keys() and all(after[name] is module for name, module in before.items())


def test_checkpoint_for_another_model_names_the_first_mismatch(tmp_path: Path) -> None:
    write_published_folder(tmp_path / "sd15", tiny_unet("sd15"))
    pipe = tiny_pipeline("sdxl")
    before = snapshot(pipe.unet)
    with pytest.raises(
        LinFusionCheckpointError,
        match=r"module 'down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1' is missing",
    ):
        LinFusion.construct_for(pipe, pretrained_model_name_or_path=tmp_path / "sd15")
    assert_untouched(pipe.unet, before)


def test_checkpoint_with_other_heads_names_the_module(tmp_path: Path) -> None:
    unet = tiny_unet("sd15")
    folder = tmp_path / "ckpt"
    write_published_folder(folder, unet)
    config = json.loads((folder / "config.json").read_text())
    config["modules_list"][1]["heads"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    before = snapshot(unet)
    name = config["modules_list"][1]["module_name"]
    with pytest.raises(
        LinFusionCheckpointError, match=rf"{name}.* 4 heads in the model .* 8 heads in the checkpoint"
    ):
        LinFusion.construct_for(unet=unet, pretrained_model_name_or_path=folder)
    assert_untouched(unet, before)


def test_checkpoint_missing_a_layer_of_the_unet(tmp_path: Path) -> None:
    unet = tiny_unet("sd15")
    linfusion = LinFusion.from_unet(unet)
    partial = LinFusion(modules_list=linfusion.config.modules_list[:-1])
    before = snapshot(unet)
    with pytest.raises(LinFusionCheckpointError, match="has no LinFusion layer in the checkpoint"):
        partial.mount(unet)
    assert_untouched(unet, before)


def test_folder_that_is_not_a_linfusion_checkpoint(tmp_path: Path) -> None:
    unet = tiny_unet("sd15")
    unet.save_pretrained(tmp_path / "unet")
    before = snapshot(unet)
    with pytest.raises(LinFusionCheckpointError, match="not a LinFusion checkpoint.*UNet2DConditionModel"):
        LinFusion.construct_for(unet=unet, pretrained_model_name_or_path=tmp_path / "unet")
    assert_untouched(unet, before)


def test_missing_folder_and_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(LinFusionCheckpointError, match="could not load LinFusion weights .*: no such folder"):
        LinFusion.from_pretrained(tmp_path / "does-not-exist")
    folder = tmp_path / "config-only"
    write_published_folder(folder, tiny_unet("sd15"))
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(LinFusionCheckpointError, match="needs config.json and diffusion_pytorch_model"):
        LinFusion.from_pretrained(folder)


def test_unknown_hub_id_offline_is_a_clear_error() -> None:
    pipe = tiny_pipeline("sd15")
    before = snapshot(pipe.unet)
    with pytest.raises(LinFusionCheckpointError, match="offline.*not in the local cache"):
        LinFusion.construct_for(pipe, pretrained_model_name_or_path="nobody/no-such-linfusion")
    assert_untouched(pipe.unet, before)


def test_unresolvable_pipeline_without_a_path() -> None:
    pipe = tiny_pipeline("sd15")
    before = snapshot(pipe.unet)
    with pytest.raises(LookupError, match="No published LinFusion weights fit this model"):
        LinFusion.construct_for(pipe)
    assert_untouched(pipe.unet, before)


def test_known_model_id_offline_resolves_then_fails_clearly() -> None:
    """The id is matched to the published weights; downloading them offline fails with the hub id named."""
    pipe = tiny_pipeline("sd15")
    before = snapshot(pipe.unet)
    with pytest.raises(LinFusionCheckpointError, match="Yuanshi/LinFusion-1-5"):
        LinFusion.construct_for(pipe, pipe_name_path="runwayml/stable-diffusion-v1-5")
    assert_untouched(pipe.unet, before)


def test_mount_on_something_that_is_not_a_model() -> None:
    linfusion = LinFusion.from_unet(tiny_unet("sd15"))
    with pytest.raises(TypeError, match="pass a diffusers pipeline"):
        linfusion.mount(object())
    with pytest.raises(ValueError, match="no `controlnet` component"):
        linfusion.mount(tiny_pipeline("sd15"), controlnet=True)


@pytest.mark.parametrize("unet", [None, "runwayml/stable-diffusion-v1-5", 3])
def test_from_unet_without_a_unet_is_a_user_error(unet: object) -> None:
    from linfusion.errors import UserError
    from linfusion.model import NotAUNetError

    with pytest.raises(
        NotAUNetError, match="LinFusion.from_unet needs the UNet or transformer module; got"
    ) as raised:
        LinFusion.from_unet(unet)
    assert isinstance(raised.value, UserError) and isinstance(raised.value, TypeError)


def test_from_unet_given_a_pipeline_points_at_its_unet() -> None:
    from types import SimpleNamespace

    from linfusion.model import NotAUNetError

    with pytest.raises(NotAUNetError, match=r"a pipeline's is pipe.unet"):
        LinFusion.default_config(SimpleNamespace(unet=None))
