"""A tiny PixArt-Sigma pipeline folder, as ``save_pretrained`` writes one, for the load-from-folder tests."""

from __future__ import annotations

from pathlib import Path

import torch

from linfusion import LinFusion
from linfusion.testing import tiny_pipeline


def save_tiny_pixart(folder: Path, linfusion: bool = True) -> Path:
    """Write a tiny PixArt-Sigma pipeline to ``folder``, with (random) LinFusion weights in ``linfusion/``
    when ``linfusion`` (the layout of a model that carries its own LinFusion, as the bundled models do)."""
    pipe = tiny_pipeline("pixart-sigma")
    pipe.save_pretrained(folder)
    if linfusion:
        torch.manual_seed(7)
        LinFusion.from_transformer(pipe.transformer, init="random").save_pretrained(folder / "linfusion")
    return folder
