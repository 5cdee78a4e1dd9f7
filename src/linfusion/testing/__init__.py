"""Models built in code for tests, examples, benchmarks and planning: nothing to download.

- :mod:`.tiny`: tiny random SD-1.5-, SD-2.1-, SD-XL-, PixArt-Alpha- and PixArt-Sigma-shaped pipelines (a few hundred kilobytes), a
  captioned image folder writer;
- :mod:`.tokenizer`: a download-free CLIP tokenizer;
- :mod:`.full_size`: full-size SD-1.5 / SD-XL / PixArt-Alpha / PixArt-Sigma pipelines with random weights
  (``meta`` for structure);
- :mod:`.parallel`: the multi-process harness that checks spatial parallelism against one process.

Production code does not need this package; only the ``random-*`` model names (SD-1.5, SD-XL, PixArt)
(benchmarks, planning without weights) load :mod:`.full_size`.
"""

from .tiny import (
    PIXART_FAMILIES,
    tiny_components,
    tiny_pipeline,
    tiny_scheduler,
    tiny_t5_encoder,
    tiny_text_encoder,
    tiny_transformer,
    tiny_unet,
    tiny_vae,
    write_image_folder,
)
from .tokenizer import byte_level_clip_tokenizer

__all__ = [
    "PIXART_FAMILIES",
    "byte_level_clip_tokenizer",
    "tiny_components",
    "tiny_pipeline",
    "tiny_scheduler",
    "tiny_t5_encoder",
    "tiny_text_encoder",
    "tiny_transformer",
    "tiny_unet",
    "tiny_vae",
    "write_image_folder",
]
