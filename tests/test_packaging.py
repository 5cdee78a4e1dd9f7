"""The built wheel carries the bundled model and classifier, its version and license, and no training code.

The wheel is built from a copy of the package's sources in a temporary folder, so the checkout gains no
``build/`` folder.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import linfusion

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "src")


@pytest.mark.slow
def test_wheel_contains_the_bundled_model(tmp_path: Path) -> None:
    had_build = (ROOT / "build").exists()
    tree = tmp_path / "tree"
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy2(source, tree / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(tree)],
        check=True, capture_output=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = wheels.glob("linfusion-*.whl")
    assert wheel.name.startswith(f"linfusion-{linfusion.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("model", "dit"):  # the bundled UNet model and the bundled tiny DiT
        model = ROOT / "src" / "linfusion" / "bundled" / folder
        expected = {
            f"linfusion/bundled/{folder}/{p.relative_to(model).as_posix()}"
            for p in model.rglob("*")
            if p.is_file()
        }
        assert expected and expected <= names, sorted(expected - names)
        assert f"linfusion/bundled/{folder}/linfusion/diffusion_pytorch_model.safetensors" in names
    assert "linfusion/bundled/classifier/model.safetensors" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert not any("training" in name or "/logs/" in name for name in names)  # the package ships no tooling
    assert (ROOT / "build").exists() == had_build  # the checkout gained no build/ folder
