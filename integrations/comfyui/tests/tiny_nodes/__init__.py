"""Test-only ComfyUI nodes: a loader of the tiny SD-1.5-shaped checkpoint the workflow tests run on."""

from __future__ import annotations

from typing import Any

from .tiny_models import tiny_checkpoint


class LinFusionTestTinyCheckpoint:
    """Stands in for CheckpointLoaderSimple in the tests' workflows (MODEL, CLIP, VAE)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, seed: int = 0) -> tuple[Any, Any, Any]:
        return tiny_checkpoint(seed)


NODE_CLASS_MAPPINGS = {"LinFusionTestTinyCheckpoint": LinFusionTestTinyCheckpoint}
