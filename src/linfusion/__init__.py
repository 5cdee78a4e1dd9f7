"""LinFusion: normalized non-causal linear attention for Stable Diffusion UNets (arXiv 2409.02097).

``LinFusion.construct_for(pipe)`` loads the published weights that fit ``pipe`` and replaces every
self-attention of its UNet; ``linfusion.unmount()`` puts the original attention back.

The public names below resolve lazily (on first use), so ``import linfusion`` and ``linfusion --help``
load neither torch nor diffusers.
"""

from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.2.0"

_EXPORTS = {
    "GeneralizedLinearAttention": "attention",
    "LinFusion": "model",
    "LinFusionCheckpointError": "model",
    "mounted_on": "model",
    "linear_attention": "ops",
    "MemoryPlan": "planner",
    "MemoryPlanner": "planner",
    "tiled_decode": "tiled_vae",
    "tiled_encode_moments": "tiled_vae",
    "sdedit": "pipelines",
    "demofusion": "pipelines",
    "upscale": "pipelines",
    "GenerationParams": "app.params",
    "generate": "app.run",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
