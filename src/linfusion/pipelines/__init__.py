"""High-resolution generation on top of any diffusers SD-1.x/2.x/XL pipeline: stage chains and their recipes."""

from .chain import Stage, plan_stages, run_chain
from .demofusion import demofusion
from .sdedit import sdedit
from .upscale import upscale, upscale_target

__all__ = ["Stage", "demofusion", "plan_stages", "run_chain", "sdedit", "upscale", "upscale_target"]
