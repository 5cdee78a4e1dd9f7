"""LinFusion: normalized non-causal linear attention for Stable Diffusion UNets (arXiv 2409.02097).

``LinFusion.construct_for(pipe)`` loads the published weights that fit ``pipe`` and replaces every
self-attention of its UNet; ``linfusion.unmount()`` puts the original attention back.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .attention import GeneralizedLinearAttention  # noqa: E402
from .model import LinFusion, LinFusionCheckpointError  # noqa: E402
from .ops import linear_attention  # noqa: E402

__all__ = [
    "GeneralizedLinearAttention",
    "LinFusion",
    "LinFusionCheckpointError",
    "__version__",
    "linear_attention",
]
