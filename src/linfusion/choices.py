"""The choices users see (modes, kernels, schedulers, dtypes), defined once for every layer.

This module imports nothing, so the command line can offer the choices in ``--help`` without torch, and
the layers that act on them (the VAE attention patch, the pipelines, the application) validate against
the very same tuples.
"""

from __future__ import annotations

GENERATION_MODES = ("plain", "sdedit", "demofusion")  # plain: one pass; the others: native size, then stages
CHAIN_MODES = ("sdedit", "demofusion")  # the stage recipes of a chain or a super-resolution
VAE_ATTENTION_MODES = ("exact", "linear")  # the VAE mid-block attention: softmax, or the linear kernel
# ... and what a run may ask for: "auto" is exact where that is cheap, linear where its fidelity on the VAE
# is measured, and exact with a warning (the predicted time, the flag to pass) elsewhere.
VAE_ATTENTION_CHOICES = ("auto", *VAE_ATTENTION_MODES)
DTYPE_NAMES = ("fp32", "fp16", "bf16")
SCHEDULERS = {  # command-line name -> diffusers class
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
}
SIZE_MULTIPLE = 8  # widths and heights: multiples of 8 pixels (the VAE works in blocks of 8)
# Denoising steps a request may ask for: a sampler cannot take as many steps as the model's training
# schedule (1000); the command line, the Python API and the web page refuse more.
MAX_STEPS = 500
BUNDLED_MODEL_NAME = "bundled"  # --model bundled (the default), recorded as "Model: bundled" in PNGs
BUNDLED_DIT_MODEL_NAME = "bundled-dit"  # --model bundled-dit: the bundled tiny PixArt-Sigma (a DiT)

__all__ = [
    "BUNDLED_DIT_MODEL_NAME",
    "BUNDLED_MODEL_NAME",
    "DTYPE_NAMES",
    "GENERATION_MODES",
    "MAX_STEPS",
    "SCHEDULERS",
    "SIZE_MULTIPLE",
    "CHAIN_MODES",
    "VAE_ATTENTION_CHOICES",
    "VAE_ATTENTION_MODES",
]
