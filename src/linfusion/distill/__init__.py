"""Distillation: make LinFusion weights for any SD-1.x / SD-2.x / SD-XL checkpoint (SPEC section 4)."""

from .config import DistillConfig
from .trainer import Distiller, distill

__all__ = ["DistillConfig", "Distiller", "distill"]
