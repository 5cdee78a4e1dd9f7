"""``linfusion generate`` / ``upscale`` on a tiny PixArt pipeline folder (its own ``linfusion/`` weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from linfusion.app.params import read_png_parameters
from linfusion.cli import main
from support.pixart import save_tiny_pixart


@pytest.fixture(scope="module")
def pixart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pixart(tmp_path_factory.mktemp("pixart"))


def generate(model: Path, out: Path, *extra: str) -> int:
    arguments = ["generate", "a red circle", "--model", str(model), "--out", str(out), "--steps", "2"]
    return main([*arguments, "--quiet", *extra])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_on_pixart_writes_the_native_size_and_repeats_from_its_png(
    pixart: Path, tmp_path: Path
) -> None:
    first = tmp_path / "first.png"
    assert generate(pixart, first, "--seed", "3", "--negative-prompt", "blue", "--scheduler", "ddim") == 0
    assert Image.open(first).size == (32, 32)  # sample size 16 x VAE factor 2
    params = read_png_parameters(first)
    assert (params.model, params.seed, params.negative_prompt, params.scheduler) == (
        str(pixart),
        3,
        "blue",
        "ddim",
    )
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(first), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(pixels(first), pixels(again))
    other = tmp_path / "other.png"
    assert generate(pixart, other, "--seed", "4", "--negative-prompt", "blue", "--scheduler", "ddim") == 0
    assert not np.array_equal(pixels(first), pixels(other))
    plain = tmp_path / "plain.png"
    assert (
        generate(
            pixart, plain, "--seed", "3", "--negative-prompt", "blue", "--scheduler", "ddim", "--no-linfusion"
        )
        == 0
    )
    assert not np.array_equal(pixels(first), pixels(plain))  # LinFusion was on by default


def test_sdedit_chain_at_twice_the_size_and_upscale_on_pixart(pixart: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    stages = tmp_path / "stages"
    assert generate(pixart, big, "--mode", "sdedit", "--size", "64x64", "--save-stages", str(stages)) == 0
    assert Image.open(big).size == (64, 64)
    assert sorted(p.name for p in stages.iterdir()) == ["stage-1-32x32.png", "stage-2-64x64.png"]
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(big), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(pixels(big), pixels(again))
    upscaled = tmp_path / "up.png"
    arguments = ["upscale", str(big), "--scale", "2", "--model", str(pixart), "--out", str(upscaled)]
    assert main([*arguments, "--steps", "2", "--quiet"]) == 0
    assert Image.open(upscaled).size == (128, 128)
    assert "Mode: sdedit" in Image.open(upscaled).info["parameters"]


def test_demofusion_and_missing_linfusion_on_pixart_are_refused_with_the_reason(
    pixart: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "demo.png"
    assert generate(pixart, out, "--mode", "demofusion", "--size", "64x64") == 2
    assert "no convolution" in capsys.readouterr().err and not out.exists()
    bare = save_tiny_pixart(tmp_path / "bare", linfusion=False)
    assert generate(bare, out) == 2
    assert "linfusion distill" in capsys.readouterr().err and not out.exists()
