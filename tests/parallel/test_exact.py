"""Spatial-parallel output against the single-process output, on 2, 3 and 4 gloo processes (tiny models).

Each group of cases runs once per module in forked processes (``linfusion.testing.parallel``); every rank
recomputes the single-process reference with the same seeds and reports the max abs difference.
"""

from __future__ import annotations

from typing import Any

import pytest

from linfusion.testing.parallel import spawn

pytestmark = [pytest.mark.multiprocess]

TOLERANCE = 1e-4  # fp32; measured differences are ~1e-6 (float summation order only)

THREE_RANKS: dict[str, dict[str, Any]] = {
    # odd height 13 -> stripes of 4, 4, 5 rows; 20 -> 6, 8, 6 (the UNet halves once: starts at even rows)
    "sd15-h13-manual-stripes": {"kind": "unet_manual", "family": "sd15", "height": 13, "width": 8},
    "sd15-h13-cfg-batch": {
        "kind": "unet",
        "family": "sd15",
        "height": 13,
        "width": 8,
        "batch": 2,
        "repeat": True,
    },
    "sd15-h20-cfg-batch": {"kind": "unet", "family": "sd15", "height": 20, "width": 6, "batch": 2},
    "sdxl-h13-cfg-batch": {"kind": "unet", "family": "sdxl", "height": 13, "width": 8, "batch": 2},
    "sd21-h11": {"kind": "unet", "family": "sd21", "height": 11, "width": 8},
    "softmax-attn1-h12": {"kind": "unet", "family": "sd15", "height": 12, "width": 8, "linfusion": False},
    "vae-decode-h13": {"kind": "vae", "height": 13, "width": 8},
    # PixArt: 12 latent rows = 6 patch rows -> 2, 2, 2; the position table is the whole grid's
    "pixart-sigma-h12-cfg-batch": {
        "kind": "transformer",
        "family": "pixart-sigma",
        "height": 12,
        "width": 8,
        "batch": 2,
    },
    # 20 rows: larger than the stored 16x16 table's grid, so the table is computed for the whole grid
    "pixart-alpha-h20": {"kind": "transformer", "family": "pixart-alpha", "height": 20, "width": 6},
    "pixart-softmax-attn1-h12": {
        "kind": "transformer",
        "family": "pixart-sigma",
        "height": 12,
        "width": 8,
        "linfusion": False,
    },
    # the linear VAE mid-block attention: the state is all-reduced, no keys or values gathered
    "vae-decode-linear-attention-h13": {"kind": "vae", "height": 13, "width": 8, "vae_attention": "linear"},
    "controlnet-h12": {"kind": "controlnet", "family": "sd15", "height": 12, "width": 8, "batch": 2},
    # DemoFusion's branch: every conv dilated 3x needs 3-row halos; the blur sees the whole latent
    "demofusion-dilated3-h20": {
        "kind": "unet",
        "family": "sd15",
        "height": 20,
        "width": 8,
        "batch": 2,
        "dilated": 3,
    },
}

TWO_RANKS: dict[str, dict[str, Any]] = {
    "sd15-h9-cfg-batch": {"kind": "unet", "family": "sd15", "height": 9, "width": 8, "batch": 2},
    "vae-decode-h5": {"kind": "vae", "height": 5, "width": 6},
    "demofusion-dilated2-sdxl-h16": {
        "kind": "unet",
        "family": "sdxl",
        "height": 16,
        "width": 8,
        "batch": 2,
        "dilated": 2,
    },
    "pipeline-sd15-text2img-cfg": {"kind": "pipeline", "family": "sd15", "height": 40, "width": 32},
    "pipeline-sdxl-text2img-cfg": {"kind": "pipeline", "family": "sdxl", "height": 32, "width": 40},
    "pipeline-sd15-img2img": {"kind": "pipeline", "family": "sd15", "task": "img2img", "height": 32},
    "pipeline-pixart-sigma-text2img-cfg": {
        "kind": "pipeline",
        "family": "pixart-sigma",
        "height": 48,
        "width": 32,
    },
}

# 4 processes = 2 guidance groups (unconditional / conditional batch halves) x 2 stripes
FOUR_RANKS: dict[str, dict[str, Any]] = {
    "sd15-h13-2cfg-x-2stripes": {"kind": "unet", "family": "sd15", "height": 13, "width": 8, "batch": 2},
    "sdxl-h10-2cfg-x-2stripes": {"kind": "unet", "family": "sdxl", "height": 10, "width": 8, "batch": 2},
    "batch1-2cfg-falls-back": {"kind": "unet", "family": "sd15", "height": 10, "width": 8, "batch": 1},
    "pipeline-sd15-2cfg-x-2stripes": {"kind": "pipeline", "family": "sd15", "height": 32, "width": 32},
    "pixart-alpha-h12-2cfg-x-2stripes": {
        "kind": "transformer",
        "family": "pixart-alpha",
        "height": 12,
        "width": 8,
        "batch": 2,
    },
}


def _run(cases: dict[str, dict[str, Any]], world: int, folder: Any, cfg_groups: int | None = None) -> dict:
    listed = [{**case, "name": name, "cfg_groups": cfg_groups} for name, case in cases.items()]
    return {result["name"]: result for result in spawn(listed, world, folder)}


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return _run(THREE_RANKS, 3, tmp_path_factory.mktemp("three"))


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return _run(TWO_RANKS, 2, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return _run(FOUR_RANKS, 4, tmp_path_factory.mktemp("four"), cfg_groups=2)


def _check(result: dict[str, Any]) -> None:
    assert result["reference_abs_max"] > 0.1, "the reference output is degenerate"
    assert result["max_abs_diff"] <= TOLERANCE, result


@pytest.mark.parametrize("name", list(THREE_RANKS))
def test_three_ranks_equal_single_process(three: dict, name: str) -> None:
    result = three[name]
    _check(result)
    sent = result["bytes"]
    if result["kind"] != "transformer":  # a DiT has no GroupNorm, and its patchify conv needs no halo
        assert sent["halo"] > 0 and sent["groupnorm"] > 0
    assert (result["kind"] == "unet_manual") == ("gather" not in sent)  # manual: the caller gathers
    if (result["kind"] == "vae" and result.get("vae_attention") != "linear") or result.get(
        "linfusion"
    ) is False:
        assert sent["kv_gather"] > 0  # softmax attention: every stripe's keys and values
    else:
        assert sent["linear_state"] > 0 and "kv_gather" not in sent  # LinFusion: only the small state


@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_two_ranks_equal_single_process(two: dict, name: str) -> None:
    _check(two[name])


@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_guidance_groups_times_stripes_equal_single_process(four: dict, name: str) -> None:
    _check(four[name])


def test_linear_state_is_small_against_gathering_keys_and_values(three: dict) -> None:
    """Same UNet and size: LinFusion's all-reduced state moves less than softmax's all-gathered K/V."""
    linear = three["sd15-h13-cfg-batch"]["bytes"]["linear_state"] / 2  # batch 2 there, 1 here
    softmax = three["softmax-attn1-h12"]["bytes"]["kv_gather"]
    assert linear < softmax
