"""The application: what ``linfusion generate`` / ``upscale`` (and the web UI) do with a model.

- :mod:`.params`: :class:`GenerationParams` (immutable) and its round trip through the PNG ``parameters`` chunk;
- :mod:`.loading`: model, device and dtype resolution, pipeline loading, LinFusion choice and mounting;
- :mod:`.prepare`: one request -> :class:`RunPlan` (stages, VAE kernel, memory plan, seed, outputs), the one
  set of defaults; every front door calls ``prepare.prepare`` (or ``prepare_steps``);
- :mod:`.execute`: ``execute.execute`` runs a :class:`RunPlan` on a loaded pipeline (render, allocator
  policy, PNG);
- :mod:`.run`: the command line's runs, :func:`generate` and :func:`upscale_file` (checks, load, prepare,
  execute, what is printed);
- :mod:`.plan`: ``linfusion plan`` (prepare on the model's structure on ``meta``, predicted GPU times).

Names resolve lazily, so importing this package costs nothing until one is used. ``prepare`` and
``execute`` are the modules here (their functions of the same name are not re-exported).
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
    "Budgets": "prepare",
    "RunPlan": "prepare",
    "prepare_steps": "prepare",
    "plan_memory": "prepare",
    "RunResult": "execute",
    "render": "execute",
    "generate": "run",
    "upscale_file": "run",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
