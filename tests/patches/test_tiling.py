"""The exact tiling patch routes a pipeline's VAE through the tiler, and its removal restores the VAE."""

from __future__ import annotations

import numpy as np

from linfusion.patches.tiling import apply_exact_tiling
from linfusion.testing import tiny_pipeline
from support import run

ONE_ROW = 1  # a band budget so small that every layer runs one row at a time


def test_pipeline_uses_exact_tiling_and_remove_restores() -> None:
    pipe = tiny_pipeline("sd15", "img2img")
    expected = run(pipe, "img2img")
    tiling = apply_exact_tiling(pipe.vae, band_bytes=ONE_ROW)
    assert "_decode" in pipe.vae.__dict__
    assert np.abs(run(pipe, "img2img") - expected).max() <= 1e-4  # encode and decode both tiled
    tiling.remove()
    assert "_decode" not in pipe.vae.__dict__ and "_encode" not in pipe.vae.__dict__
    assert np.array_equal(run(pipe, "img2img"), expected)
    with apply_exact_tiling(pipe.vae, min_pixels=10**9):  # below the threshold: the plain path
        assert np.array_equal(run(pipe, "img2img"), expected)
    assert "_decode" not in pipe.vae.__dict__
