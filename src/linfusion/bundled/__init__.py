"""The small bundled text-to-image model: its files, its data set's vocabulary, and a classifier that reads
its images back into captions.

- :mod:`.paths`: the model folder (a diffusers ``StableDiffusionPipeline`` with LinFusion weights in its
  ``linfusion/`` subfolder) and the classifier folder;
- :mod:`.shapes`: the coloured-shapes scenes it was trained on: captions, vocabulary, rendering;
- :mod:`.classifier`: scores generated images against the scenes their captions describe.

The training code lives outside the package (``scripts/bundled/``), with its logs.
"""

from __future__ import annotations

from typing import Any

from .paths import CLASSIFIER_DIR, IMAGE_SIZE, MODEL_DIR


def load_pipeline(folder: Any = MODEL_DIR, dtype: Any = None) -> Any:
    """Load the bundled pipeline offline (fp32 by default: fp16 matmuls are slow or missing on CPU)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), dtype=dtype or torch.float32, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["CLASSIFIER_DIR", "IMAGE_SIZE", "MODEL_DIR", "load_pipeline"]
