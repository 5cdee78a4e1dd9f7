"""The built wheel carries the bundled model and classifier, so `pip install linfusion` can run the demo."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_the_bundled_model(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("linfusion-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    model = ROOT / "src" / "linfusion" / "bundled" / "model"
    expected = {
        f"linfusion/bundled/model/{p.relative_to(model).as_posix()}" for p in model.rglob("*") if p.is_file()
    }
    assert expected and expected <= names, sorted(expected - names)
    assert "linfusion/bundled/model/linfusion/diffusion_pytorch_model.safetensors" in names
    assert "linfusion/bundled/classifier/model.safetensors" in names
