"""Exact spatial-parallel inference on ``torch.distributed``: the latent split into row stripes, one per rank.

Linear self-attention all-reduces its small per-head state, GroupNorm its moments, convolutions exchange
halo rows; the result equals the single-process output (up to float summation order). See
``docs/parallel.md``. Names are imported lazily so that ``linfusion --help`` does not import torch.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "GLOBAL_STATS": "comm",
    "CommStats": "comm",
    "Communicator": "comm",
    "StripeLayoutError": "layout",
    "bounds_at": "layout",
    "downsampling_factor": "layout",
    "stripe_bounds": "layout",
    "SpatialParallel": "patch",
    "UnsupportedLayerError": "patch",
    "spatial_parallel": "patch",
    "ParallelPipeline": "pipeline",
    "Topology": "pipeline",
    "default_cfg_groups": "pipeline",
    "make_topology": "pipeline",
    "parallel_pipeline": "pipeline",
    "enable_for_pipeline": "launch",
    "is_main_process": "launch",
    "parallel_command": "launch",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
