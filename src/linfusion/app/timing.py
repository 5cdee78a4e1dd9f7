"""How long a run will take on this machine, predicted from its FLOPs before it starts.

The memory plan counts each stage's FLOPs; dividing by what this device sustains gives a prediction that
``linfusion generate`` prints before a run expected to last more than a minute. On the CPU the rate is a
short matrix-multiply measurement of this process (its threads, its load) times :data:`CPU_EFFICIENCY`,
the share of that rate a whole diffusion chain sustains, measured on this project's 2-core machine
(``benchmarks/cpu_efficiency.py``). On a GPU it is the published peak of a known model times the same efficiency as
``linfusion plan`` uses. Predictions, not measurements: printed as "about".
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPU:
    """A GPU's published peak dense throughput (FLOP/s) by dtype."""

    name: str
    peak: dict[str, float]


# Published dense tensor-core peaks (no sparsity): H100 SXM, A100 SXM, GeForce RTX 4090 (fp16/bf16 with
# fp32 accumulation, as PyTorch's kernels run them; fp32 as tf32 on the first two, plain fp32 on the 4090).
GPUS = {
    "h100": GPU("NVIDIA H100 SXM", {"float16": 989.4e12, "bfloat16": 989.4e12, "float32": 494.7e12}),
    "a100": GPU("NVIDIA A100 SXM", {"float16": 312e12, "bfloat16": 312e12, "float32": 156e12}),
    "4090": GPU("NVIDIA GeForce RTX 4090", {"float16": 165.2e12, "bfloat16": 165.2e12, "float32": 82.6e12}),
}
# The fraction of that peak a diffusion UNet and VAE sustain end to end: an assumption (convolutions and
# GEMMs run near peak, GroupNorm, activations and memory traffic do not), not a measurement.
EFFICIENCY = 0.35
# Host<->device links in bytes/s, one direction, theoretical: PCIe 4.0 x16 is 16 GT/s x 16 lanes with
# 128b/130b coding (31.5 GB/s, "32 GB/s"), PCIe 5.0 x16 twice that. Copies from pinned host memory commonly
# reach about 80 % of it (LINK_EFFICIENCY, an assumption; pageable copies, as the tiled VAE's, may be
# slower). A stage's transfer bytes sum both directions and are timed against one direction's rate, and
# added to its compute time: no overlap with compute or between directions (the banded UNet does overlap
# its copies with compute on CUDA, so its predictions err long).
LINKS = {"pcie4": 32e9, "pcie5": 64e9}
LINK_EFFICIENCY = 0.8
GPU_LINKS = {"h100": "pcie5", "a100": "pcie4", "4090": "pcie4"}  # the host link of each GPU above

# The share of a plain fp32 matrix multiply's rate a whole diffusion chain sustains on the CPU. Measured by
# benchmarks/cpu_efficiency.py (figures: docs/high-resolution.md, section "Memory planner"); set so that long
# runs, the ones announced, are predicted about right or short.
CPU_EFFICIENCY = 0.4
ANNOUNCE_SECONDS = 60.0  # runs predicted to last longer are announced before they start


@functools.cache
def cpu_matmul_rate(dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a 512 x 512 matrix multiply in ``dtype`` with this process's threads (best of a few: ~20 ms
    in fp32; fp16 can be tens of times slower on CPUs without native half-precision arithmetic)."""
    a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
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


__all__ = [
    "ANNOUNCE_SECONDS",
    "CPU_EFFICIENCY",
    "EFFICIENCY",
    "GPU",
    "GPUS",
    "GPU_LINKS",
    "LINKS",
    "LINK_EFFICIENCY",
    "describe_duration",
    "predicted_seconds",
    "sustained_rate",
]
