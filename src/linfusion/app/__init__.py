"""The application: what ``linfusion generate`` / ``upscale`` (and the web UI) do with a model.

- :mod:`.params`: :class:`GenerationParams` (immutable) and its round trip through the PNG ``parameters`` chunk;
- :mod:`.loading`: model, device and dtype resolution, pipeline loading, LinFusion choice and mounting;
- :mod:`.run`: planning, rendering on a loaded pipeline, writing the PNG; :func:`generate`, :func:`upscale_file`.

Names resolve lazily, so importing this package costs nothing until one is used.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "GenerationError": "params",
    "GenerationParams": "params",
    "read_png_parameters": "params",
    "LoadedPipeline": "loading",
    "load": "loading",
    "load_pipeline": "loading",
    "generate": "run",
    "plan_memory": "run",
    "render": "run",
    "upscale_file": "run",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
