"""Distillation: make LinFusion weights for any SD-1.x / SD-2.x / SD-XL or PixArt-Alpha / PixArt-Sigma
checkpoint from images + captions.

Names resolve lazily (:mod:`.config` is torch-free, so the command line reads its defaults cheaply).
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {"DistillConfig": "config", "Distiller": "trainer", "distill": "trainer"}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
