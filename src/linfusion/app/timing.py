"""How long a run will take on this machine, predicted from its FLOPs before it starts.

The memory plan counts each stage's FLOPs; dividing by what this device sustains gives a prediction that
``linfusion generate`` prints before a run expected to last more than a minute. On the CPU the rate is a
short matrix-multiply measurement of this process (its threads, its load) times :data:`CPU_EFFICIENCY`,
the share of that rate a whole diffusion chain sustains, fitted on this project's 2-core machine (see
docs/high-resolution.md). On a GPU it is the published peak of a known model times the same efficiency as
``linfusion plan`` uses. Predictions, not measurements: printed as "about".
"""

from __future__ import annotations

import functools
import time

import torch

from .plan import EFFICIENCY, GPUS

# A diffusion chain on the CPU (convolutions, GEMMs, GroupNorm, element-wise work) sustains this share of a
# plain fp32 matrix multiply's rate: 0.55 fitted on the bundled model's SDEdit chain to 1024x1024 (10 steps,
# linear VAE attention, 1 thread; measured 0.45-0.62 over repeated runs on the shared 2-core machine).
CPU_EFFICIENCY = 0.55
ANNOUNCE_SECONDS = 60.0  # runs predicted to last longer are announced before they start


@functools.cache
def cpu_matmul_rate() -> float:
    """FLOP/s of an fp32 512 x 512 matrix multiply with this process's threads (best of a few, ~20 ms)."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    torch.mm(a, b)  # warm-up: the first call loads kernels
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * 512**3 / max(best, 1e-9)


def sustained_rate(device: torch.device, dtype: torch.dtype) -> float | None:
    """FLOP/s a diffusion chain is predicted to sustain on ``device`` (None: an unknown GPU)."""
    if device.type == "cpu":
        return cpu_matmul_rate() * CPU_EFFICIENCY
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device).lower()
        for key, gpu in GPUS.items():
            if key in name:
                dtype_name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, "float32")
                return gpu.peak[dtype_name] * EFFICIENCY
    return None


def predicted_seconds(flops: float, device: torch.device, dtype: torch.dtype) -> float | None:
    """The predicted time of ``flops`` on ``device``, or None when the device's rate is unknown."""
    rate = sustained_rate(device, dtype)
    return None if rate is None else flops / rate


def describe_duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["ANNOUNCE_SECONDS", "CPU_EFFICIENCY", "describe_duration", "predicted_seconds", "sustained_rate"]
