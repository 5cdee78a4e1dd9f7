"""Loading PixArt pipelines through the one load path: LinFusion attached, the bundled-dit name, sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from linfusion import LinFusion
from linfusion.app import loading
from linfusion.app.checks import preflight
from linfusion.app.params import GenerationError, GenerationParams
from linfusion.app.prepare import Budgets
from linfusion.bundled.paths import DIT_MODEL_DIR
from support.pixart import save_tiny_pixart


@pytest.fixture(scope="module")
def pixart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny PixArt-Sigma pipeline folder with its own LinFusion weights in ``linfusion/``."""
    return save_tiny_pixart(tmp_path_factory.mktemp("pixart"))


@pytest.fixture(scope="module")
def bare_pixart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same without LinFusion weights."""
    return save_tiny_pixart(tmp_path_factory.mktemp("bare"), linfusion=False)


def linear_layers(pipe) -> list[torch.nn.Module]:
    return [m for m in pipe.transformer.modules() if type(m).__name__ == "GeneralizedLinearAttention"]


def holds_weights(pipe, folder: Path) -> bool:
    """Whether the mounted LinFusion layers hold exactly the weights saved in ``folder`` (as sorted values)."""
    mounted = torch.cat([p.detach().flatten() for layer in linear_layers(pipe) for p in layer.parameters()])
    saved = torch.cat([v.flatten() for v in LinFusion.from_pretrained(folder).state_dict().values()])
    return torch.equal(mounted.sort().values, saved.sort().values)


def test_a_pixart_folder_loads_with_its_own_linfusion_weights(pixart: Path) -> None:
    loaded = loading.load(GenerationParams("a red circle", model=str(pixart), steps=2), device="cpu")
    try:
        assert type(loaded.pipe).__name__ == "PixArtSigmaPipeline"
        assert loaded.is_dit and not loaded.is_sdxl
        assert (loaded.native_size, loaded.minimum_side) == (32, 4)
        assert len(linear_layers(loaded.pipe)) == 2  # one per block's attn1
        assert holds_weights(loaded.pipe, pixart / "linfusion")
    finally:
        loaded.patch.remove()
    assert not linear_layers(loaded.pipe)


def test_linfusion_path_loads_those_weights_and_auto_without_a_folder_says_to_distill(
    pixart: Path, bare_pixart: Path
) -> None:
    params = GenerationParams("a red circle", model=str(bare_pixart), linfusion=str(pixart / "linfusion"))
    loaded = loading.load(params, device="cpu")
    assert holds_weights(loaded.pipe, pixart / "linfusion")
    loaded.patch.remove()
    refusal = r"no LinFusion weights are published for diffusion transformers"
    with pytest.raises(GenerationError, match=refusal) as error:
        loading.load(params.replace(linfusion="auto"), device="cpu")
    message = str(error.value)
    assert f"linfusion distill --teacher {bare_pixart}" in message and "--no-linfusion" in message
    plain = loading.load(params.replace(linfusion="none"), device="cpu")
    assert not linear_layers(plain.pipe)


def test_bundled_dit_names_the_bundled_dit_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert Path(loading.__file__).resolve().parent.parent / "bundled" / "dit" == DIT_MODEL_DIR
    assert loading.resolve_model("bundled-dit") == str(DIT_MODEL_DIR)
    loading.check_model_exists("bundled-dit")  # a known name, not a folder to look for
    missing = tmp_path / "dit"
    monkeypatch.setattr(loading, "DIT_MODEL_DIR", missing)
    with pytest.raises(GenerationError, match="the bundled DiT is not in this installation"):
        loading.load(GenerationParams("a red circle", model="bundled-dit"), device="cpu")


def test_a_dit_is_known_before_loading(pixart: Path, tmp_path: Path) -> None:
    assert loading.pipeline_class_name(str(pixart)) == "PixArtSigmaPipeline"
    assert loading.names_dit(str(pixart)) and loading.names_dit("random-pixart-sigma")
    assert not loading.names_dit("bundled") and not loading.names_dit(str(tmp_path / "nothing"))


def test_demofusion_on_a_dit_is_refused_before_loading(pixart: Path, tmp_path: Path) -> None:
    params = GenerationParams("a red circle", model=str(pixart), mode="demofusion", width=64, height=64)
    with pytest.raises(GenerationError, match="no convolution .* use --mode sdedit"):
        preflight(params, tmp_path / "out.png", "cpu", Budgets())
    preflight(params.replace(mode="sdedit"), tmp_path / "out.png", "cpu", Budgets())


def test_the_structure_of_a_pixart_folder_on_meta(pixart: Path) -> None:
    structure = loading.load_structure(str(pixart), torch.float32)
    assert structure.transformer.device.type == "meta" and structure.vae_scale_factor == 2
    assert structure.tokenizer.model_max_length == 300  # PixArt-Sigma's T5 tokens, not the tokenizer's
    assert any(type(m).__name__ == "GeneralizedLinearAttention" for m in structure.transformer.modules())
