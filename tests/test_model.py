"""LinFusion container: full-size structure, registry, published layout, save/load, mount semantics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention
from safetensors.torch import load_file

from linfusion import GeneralizedLinearAttention, LinFusion, mounted_on
from linfusion.patches import PatchOrderError
from linfusion.registry import (
    attention_signature,
    build_meta_unet,
    checkpoint_for_model_id,
    normalize_model_id,
    resolve_checkpoint,
)
from linfusion.testing import tiny_pipeline, tiny_unet
from support import write_published_folder


def published_parameter_count(width: int, mid: int) -> int:
    """SPEC 3: per module 4C^2 + C + 2(2Cm + 3m + C)."""
    return 4 * width**2 + width + 2 * (2 * width * mid + 3 * mid + width)


# ---------------------------------------------------------------- full-size structure on the meta device
@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "modules", "parameters", "head_dims"),
    [
        ("sd15", 16, 99_235_520, {40, 80, 160}),
        ("sd21", 16, 99_235_520, {64}),
        ("sdxl", 70, 435_480_800, {64}),
    ],
)
def test_full_size_structure_on_meta(family: str, modules: int, parameters: int, head_dims: set[int]) -> None:
    unet = build_meta_unet(family)
    linfusion = LinFusion.from_unet(unet)
    entries = linfusion.config.modules_list
    assert len(entries) == modules
    assert sum(p.numel() for p in linfusion.parameters()) == parameters
    assert all(p.device.type == "meta" for p in linfusion.parameters())
    assert {entry["dim_n"] // entry["heads"] for entry in entries} == head_dims
    expected_total = sum(
        published_parameter_count(e["dim_n"], e["projection_mid_dim"] or e["dim_n"]) for e in entries
    )
    assert expected_total == parameters
    if family == "sdxl":
        assert {e["projection_mid_dim"] for e in entries} == {40, 80}  # C / 16
    else:
        assert {e["projection_mid_dim"] for e in entries} == {None}  # published: null means C


@pytest.mark.slow
def test_sd15_module_paths_are_the_published_ones() -> None:
    paths = [path for path, _, _ in attention_signature(build_meta_unet("sd15"))]
    expected = [
        f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1" for b in range(3) for a in range(2)
    ]
    expected += [
        f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1" for b in (1, 2, 3) for a in range(3)
    ]
    expected.append("mid_block.attentions.0.transformer_blocks.0.attn1")
    # Discovery follows named_modules() order (diffusers registers up_blocks before mid_block); checkpoints
    # name each layer by path, so loading never depends on that order.
    assert len(paths) == 16 and set(paths) == set(expected)


# ---------------------------------------------------------------- registry
def test_model_id_normalization_and_mirrors() -> None:
    assert normalize_model_id("Runwayml/Stable-Diffusion-v1-5/") == "runwayml/stable-diffusion-v1-5"
    cache = "/root/.cache/huggingface/hub/models--stabilityai--stable-diffusion-2-1/snapshots/abc123/unet"
    assert normalize_model_id(cache) == "stabilityai/stable-diffusion-2-1"
    assert (
        checkpoint_for_model_id("stable-diffusion-v1-5/stable-diffusion-v1-5").repo_id
        == "Yuanshi/LinFusion-1-5"
    )
    assert checkpoint_for_model_id(cache).repo_id == "Yuanshi/LinFusion-2-1"
    assert checkpoint_for_model_id("someone/unknown-model") is None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "repo_id"),
    [("sd15", "Yuanshi/LinFusion-1-5"), ("sd21", "Yuanshi/LinFusion-2-1"), ("sdxl", "Yuanshi/LinFusion-XL")],
)
def test_architecture_fallback_finds_the_right_checkpoint(family: str, repo_id: str) -> None:
    """A fine-tune in a local folder (unknown id) is matched by its attn1 layout, SD-1.5 vs 2.1 by heads."""
    unet = build_meta_unet(family)
    found, reason = resolve_checkpoint(unet, ["/data/my-finetune", None])
    assert found == repo_id and "architecture" in reason


def test_explicit_id_wins_over_architecture() -> None:
    found, reason = resolve_checkpoint(tiny_unet("sd15"), ["Lykon/dreamshaper-8"])
    assert (found, reason) == ("Yuanshi/LinFusion-1-5", "model id 'Lykon/dreamshaper-8'")


def test_unresolvable_model_lists_what_was_tried() -> None:
    with pytest.raises(LookupError) as error:
        resolve_checkpoint(tiny_unet("sd15"), ["me/tiny-model"])
    message = str(error.value)
    assert "'me/tiny-model'" in message and "UNet architecture" in message
    assert "pretrained_model_name_or_path" in message


# ---------------------------------------------------------------- published layout, legacy layout, round trip
@pytest.mark.parametrize("legacy", [False, True])
def test_published_layout_loads_exactly(tmp_path: Path, legacy: bool) -> None:
    unet = tiny_unet("sd15")
    tensors = write_published_folder(tmp_path / "ckpt", unet, legacy=legacy)
    linfusion = LinFusion.from_pretrained(tmp_path / "ckpt", torch_dtype=torch.float16)
    state = linfusion.state_dict()
    assert set(state) == set(tensors)
    assert all(torch.equal(state[key], tensors[key]) for key in tensors)
    assert linfusion.config.modules_list[0]["module_name"].endswith("attn1")
    linfusion.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert saved["_class_name"] == "LinFusion"
    assert (
        isinstance(saved["modules_list"][0], dict) and saved["modules_list"][0]["projection_mid_dim"] is None
    )


def test_save_pretrained_writes_the_published_key_names(tmp_path: Path) -> None:
    linfusion = LinFusion.from_unet(tiny_unet("sdxl"))
    linfusion.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    keys = set(load_file(str(tmp_path / "diffusion_pytorch_model.safetensors")))
    assert "0.to_q.weight" in keys and "0.to_q_.3.bias" in keys and "0.to_out.0.bias" in keys
    assert len(keys) == 17 * len(linfusion.config.modules_list)
    reloaded = LinFusion.from_pretrained(tmp_path)
    assert reloaded.config.modules_list == linfusion.config.modules_list
    assert all(
        torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), linfusion.state_dict().values())
    )


def test_a_full_disk_under_save_pretrained_is_an_os_error_naming_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs) -> None:  # what safetensors raises on a full disk (seen on a tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as raised:
        LinFusion.from_unet(tiny_unet("sd15")).save_pretrained(tmp_path / "weights")
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(tmp_path / "weights"))


# ---------------------------------------------------------------- building untrained modules
def test_projection_mid_dim_defaults_and_overrides() -> None:
    sd15, sdxl = tiny_unet("sd15"), tiny_unet("sdxl")
    assert {e["projection_mid_dim"] for e in LinFusion.default_config(sd15)["modules_list"]} == {None}
    assert {e["projection_mid_dim"] for e in LinFusion.default_config(sdxl)["modules_list"]} == {4}  # 64 / 16
    no_mlp = LinFusion.from_unet(sd15, projection_mid_dim=-1)
    assert all(isinstance(layer.to_q_, torch.nn.Identity) for layer in no_mlp.modules_dict.values())
    narrow = LinFusion.from_unet(sd15, projection_mid_dim=8)
    assert all(layer.to_q_[0].out_features == 8 for layer in narrow.modules_dict.values())
    assert LinFusion.get_default_config(unet=sd15) == LinFusion.default_config(sd15)


def test_teacher_init_reproduces_the_teacher_projections() -> None:
    unet = tiny_unet("sd15")
    linfusion = LinFusion.from_unet(unet, init="teacher")
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        for path, layer in linfusion.modules_dict.items():
            teacher = unet.get_submodule(path)
            width = layer.dim
            x = torch.randn(2, 10, width)
            assert torch.equal(layer.to_q(x + layer.to_q_(x)), teacher.to_q(x))
            assert torch.equal(layer.to_k(x + layer.to_k_(x)), teacher.to_k(x))
            assert torch.equal(layer.to_v.weight, teacher.to_v.weight)
            assert torch.equal(layer.to_out[0].bias, teacher.to_out[0].bias)
    random_init = LinFusion.from_unet(unet, init="random")
    first = next(iter(random_init.modules_dict))
    assert not torch.equal(random_init.modules_dict[first].to_q.weight, unet.get_submodule(first).to_q.weight)
    with pytest.raises(ValueError, match="init must be"):
        LinFusion.from_unet(unet, init="zeros")


# ---------------------------------------------------------------- mounting semantics
def attn1_types(unet: torch.nn.Module) -> set[type]:
    return {type(m) for name, m in unet.named_modules() if name.endswith("attn1")}


def test_mount_twice_is_harmless_and_a_second_linfusion_stacks_on_the_first() -> None:
    unet = tiny_unet("sd15")
    originals = {path: unet.get_submodule(path) for path, _, _ in attention_signature(unet)}
    first = LinFusion.from_unet(unet)
    first_handle = first.mount(unet)
    again = first.mount(unet)
    assert first_handle.changed and not again.changed
    assert mounted_on(unet) is first
    second = LinFusion.from_unet(unet, init="teacher")  # built while `first` is mounted: copies the originals
    with second.mount(unet):
        assert mounted_on(unet) is second
        assert all(unet.get_submodule(p) is layer for p, layer in second.modules_dict.items())
        with pytest.raises(PatchOrderError, match="unmount that one first"):
            first.unmount()  # `second` sits on top: removing `first` now would drop it silently
    assert mounted_on(unet) is first and not second.is_mounted
    assert all(unet.get_submodule(p) is layer for p, layer in first.modules_dict.items())
    first.unmount()
    assert all(unet.get_submodule(path) is module for path, module in originals.items())
    assert attn1_types(unet) == {Attention} and mounted_on(unet) is None


def test_mounting_does_not_register_the_container_in_the_unet() -> None:
    unet = tiny_unet("sd15")
    keys_before = set(unet.state_dict())
    linfusion = LinFusion.from_unet(unet)
    linfusion.mount(unet)
    keys = set(unet.state_dict())
    assert not any("linfusion" in key for key in keys)
    assert any(key.endswith("attn1.to_q_.0.weight") for key in keys)  # the layers themselves are in place
    linfusion.unmount()
    assert set(unet.state_dict()) == keys_before


def test_mounted_layers_train() -> None:
    unet = tiny_unet("sd15")
    linfusion = LinFusion.from_unet(unet)
    linfusion.mount(unet)
    sample = torch.randn(1, 4, 16, 16)
    out = unet(sample, 10, encoder_hidden_states=torch.randn(1, 7, 32)).sample
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in linfusion.parameters())


def test_unmount_moves_the_originals_where_the_unet_went() -> None:
    unet = tiny_unet("sd15")
    linfusion = LinFusion.from_unet(unet)
    linfusion.mount(unet)
    unet.to(torch.float64)
    linfusion.unmount()
    assert {p.dtype for p in unet.parameters()} == {torch.float64}


def test_mount_on_pipeline_uses_its_unet() -> None:
    pipe = tiny_pipeline("sd21")
    linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
    assert attn1_types(pipe.unet) == {GeneralizedLinearAttention}
    assert linfusion.config.modules_list[0]["heads"] == 2
    linfusion.unmount(pipe)
    assert attn1_types(pipe.unet) == {Attention}
