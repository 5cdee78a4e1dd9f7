"""Where the bundled model and its classifier live in the installed package, and their native size."""

from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent
MODEL_DIR = (
    BUNDLED_DIR / "model"
)  # a diffusers StableDiffusionPipeline folder, LinFusion weights in linfusion/
DIT_MODEL_DIR = (
    BUNDLED_DIR / "dit"
)  # a diffusers PixArtSigmaPipeline folder (tiny DiT), LinFusion weights in linfusion/
CLASSIFIER_DIR = BUNDLED_DIR / "classifier"
IMAGE_SIZE = 32  # the size the model was trained at (its native size)

__all__ = ["BUNDLED_DIR", "CLASSIFIER_DIR", "DIT_MODEL_DIR", "IMAGE_SIZE", "MODEL_DIR"]
