"""High-resolution generation on top of any diffusers SD-1.x/2.x/XL pipeline."""

from .demofusion import demofusion
from .sdedit import Stage, plan_stages, sdedit, upscale, upscale_target

__all__ = ["Stage", "demofusion", "plan_stages", "sdedit", "upscale", "upscale_target"]
