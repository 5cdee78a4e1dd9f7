"""Planning a request without running it: the stages, each one's device and host peak, savers, FLOPs and a
predicted time on a named GPU. What ``linfusion plan`` prints; it needs neither the device nor weights.

The pipeline is built on the ``meta`` device from its configs (:func:`~linfusion.app.loading.load_structure`),
so a plan for an 80 GB GPU can be made on a laptop. Times are *predictions*, never measurements: FLOPs
divided by the GPU's published peak dense fp16/bf16 (tf32 for fp32) throughput times :data:`EFFICIENCY`,
plus the bytes the stage moves between host and device divided by the link's rate (:data:`LINKS` times
:data:`LINK_EFFICIENCY`), the two added (no overlap assumed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..choices import BUNDLED_MODEL_NAME, VAE_ATTENTION_CHOICES
from ..io import format_size, parse_size
from ..pipelines.chain import Stage, native_long_side, plan_stages, unet_calls
from ..planner import MemoryPlan, MemoryPlanner
from ..registry import is_sdxl
from .params import GenerationError


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
DTYPE_NAMES = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float32": "float32", "fp32": "float32"}  # fmt: skip
DEFAULT_HOST_BUDGET = "64GB"


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: the model, the final size and recipe, the device, the budgets."""

    model: str = BUNDLED_MODEL_NAME
    width: int = 1024
    height: int = 1024
    mode: str = "sdedit"  # plain, sdedit or demofusion
    device: str = "cuda"
    dtype: str = "float16"
    max_memory: str | None = None
    host_memory: str = DEFAULT_HOST_BUDGET
    steps: int = 25
    guidance: float = 7.5
    nproc: int = 1
    gpu: str = "h100"
    linfusion: bool = True
    vae_attention: str = "auto"  # exact, linear, or auto: what ``linfusion generate`` would pick
    link: str | None = None  # the host<->device link of the predicted transfers (None: the GPU's own)


@dataclass(frozen=True)
class PlannedRun:
    """A plan with the stages it was made for and how many UNet calls each runs."""

    request: PlanRequest
    stages: tuple[Stage, ...]
    unet_calls: tuple[int, ...]
    plan: MemoryPlan
    stripes: int  # processes sharing each stage (the plan is one rank's)
    vae_attention: str  # the VAE mid-block kernel planned (auto settled)

    @property
    def link(self) -> str:
        return self.request.link or GPU_LINKS[self.request.gpu]

    def transfer_seconds(self) -> list[float]:
        """Each stage's predicted host<->device copy time (transfer bytes / (link x LINK_EFFICIENCY))."""
        rate = LINKS[self.link] * LINK_EFFICIENCY
        return [stage.transfer_bytes / rate for stage in self.plan.stages]

    def predicted_seconds(self) -> list[float]:
        """Each stage's predicted time on ``request.gpu``: FLOPs / (peak x EFFICIENCY) plus its transfer
        seconds (no overlap assumed)."""
        gpu = GPUS[self.request.gpu]
        throughput = gpu.peak[DTYPE_NAMES[self.request.dtype]] * EFFICIENCY
        transfers = self.transfer_seconds()
        return [stage.flops / throughput + moved for stage, moved in zip(self.plan.stages, transfers)]

    def to_json(self) -> dict[str, Any]:
        data = self.plan.to_json()
        rows = zip(
            data["stages"], self.stages, self.unet_calls, self.predicted_seconds(), self.transfer_seconds()
        )
        for entry, stage, calls, predicted, moved in rows:
            entry.update(
                strength=stage.strength, unet_calls=calls, predicted_seconds=predicted, transfer_seconds=moved
            )
        data.update(
            model=self.request.model,
            mode=self.request.mode,
            dtype=DTYPE_NAMES[self.request.dtype],
            nproc=self.stripes,
            vae_attention=self.vae_attention,
            prediction={
                "gpu": GPUS[self.request.gpu].name,
                "efficiency": EFFICIENCY,
                "link": self.link,
                "link_bytes_per_second": LINKS[self.link],
                "link_efficiency": LINK_EFFICIENCY,
                "predicted": True,
            },
        )
        if not self.plan.fits:
            data["smallest_device_budget_bytes"] = self.plan.peak
            data["smallest_host_budget_bytes"] = self.plan.host_peak
        return data

    def describe(self) -> str:
        request, plan = self.request, self.plan
        gpu = GPUS[request.gpu]
        rank = f", one rank of {self.stripes} (its stripe of every stage)" if self.stripes > 1 else ""
        host = "" if plan.host_budget is None else f", host {format_size(plan.host_budget)}"
        lines = [
            f"plan: {request.model}, {request.mode} to {request.width}x{request.height}, "
            f"{DTYPE_NAMES[request.dtype]} on {request.device}, LinFusion {'on' if request.linfusion else 'off'}, "
            f"VAE attention {self.vae_attention}{rank}",
            f"budgets: device {format_size(plan.budget)}{host}",
        ]
        timed = zip(plan.stages, self.predicted_seconds(), self.transfer_seconds())
        for index, (planned, seconds, moved) in enumerate(timed):
            parked = format_size(planned.host_peak) if planned.host_peak else "0"
            transfers = (
                f", {format_size(planned.transfer_bytes)} host<->device ({moved:.1f} s of it)"
                if planned.transfer_bytes
                else ""
            )
            lines.append(
                f"  stage {index + 1} {planned.width}x{planned.height}: device {format_size(planned.peak)}, "
                f"host {parked}, {planned.flops:.3g} FLOPs ({planned.flops / max(planned.plain_flops, 1):.2f}x "
                f"plain), predicted {seconds:.1f} s{transfers}; savers: {', '.join(planned.savers.names())}"
            )
        total = sum(self.predicted_seconds())
        lines.append(
            f"{'fits' if plan.fits else 'does NOT fit'}: device peak {format_size(plan.peak)}, host peak "
            f"{format_size(plan.host_peak)}; {plan.flops:.3g} FLOPs in all, predicted {total:.0f} s on one "
            f"{gpu.name} at {EFFICIENCY:.0%} of its {gpu.peak[DTYPE_NAMES[request.dtype]] / 1e12:.0f} TFLOP/s "
            f"peak, host<->device transfers over {self.link} at {LINK_EFFICIENCY:.0%} of "
            f"{LINKS[self.link] / 1e9:.0f} GB/s, not overlapped (a prediction, not a measurement)"
        )
        if not plan.fits:
            lines.append(
                f"smallest budgets that fit: --max-memory {_flag(plan.peak)}"
                + (f" --host-memory {_flag(plan.host_peak)}" if plan.host_budget is not None else "")
            )
        return "\n".join(lines)


def _flag(size: int) -> str:
    from ..io import size_flag

    return size_flag(size)


def validate(request: PlanRequest) -> None:
    """Refuse what cannot be planned, with what to change."""
    if request.gpu not in GPUS:
        raise GenerationError(f"unknown GPU {request.gpu!r}; choose one of {', '.join(GPUS)}")
    if request.link is not None and request.link not in LINKS:
        raise GenerationError(f"unknown link {request.link!r}; choose one of {', '.join(LINKS)}")
    if request.dtype not in DTYPE_NAMES:
        raise GenerationError(f"unknown dtype {request.dtype!r}; choose float16, bfloat16 or float32")
    if request.vae_attention not in VAE_ATTENTION_CHOICES:
        raise GenerationError(
            f"unknown VAE attention {request.vae_attention!r}; choose {', '.join(VAE_ATTENTION_CHOICES)}"
        )
    if request.nproc < 1:
        raise GenerationError(f"--nproc must be >= 1; got {request.nproc}")
    if request.steps < 1:
        raise GenerationError(f"--steps must be >= 1; got {request.steps}")
    for value in (request.max_memory, request.host_memory):
        if value is not None:
            try:
                parse_size(value)
            except ValueError as error:
                raise GenerationError(str(error)) from error


def make_plan(request: PlanRequest) -> PlannedRun:
    """Build the model's structure on ``meta`` and plan every stage of the request for one rank."""
    import torch

    from ..parallel.layout import StripeLayoutError, stripe_bounds
    from ..patches.vae_attention import apply_vae_attention
    from ..vae_attention import mid_block_tokens
    from .loading import auto_vae_attention, load_structure

    validate(request)
    dtype = getattr(torch, DTYPE_NAMES[request.dtype])
    structure = load_structure(request.model, dtype)
    if not request.linfusion:
        from ..model import mounted_on

        mounted = mounted_on(structure.unet)
        if mounted is not None:
            mounted.unmount()
    native = native_long_side(structure)
    if request.mode == "plain":
        stages = [Stage(request.width, request.height, None)]
    else:
        try:
            sdxl = is_sdxl(structure) or request.mode == "demofusion"  # the SD-XL strengths
            stages = plan_stages(request.width, request.height, native, sdxl=sdxl)
        except ValueError as error:
            raise GenerationError(str(error)) from error
    calls = [unet_calls(stage, request.steps, request.mode) for stage in stages]
    vae_attention = request.vae_attention
    if vae_attention == "auto":
        largest = max((stage.size for stage in stages), key=lambda size: size[0] * size[1])
        vae_attention = auto_vae_attention(request.model, mid_block_tokens(structure.vae, *largest))
    apply_vae_attention(structure.vae, vae_attention)  # the meta structure is this plan's own
    planner = MemoryPlanner(structure, device=request.device, dtype=dtype)
    if request.max_memory is None and request.device.startswith("cuda") and not torch.cuda.is_available():
        raise GenerationError("no CUDA device here to read the free memory of: pass --max-memory (e.g. 12GB)")
    sizes = []
    for stage in stages:
        height = stage.height
        if request.nproc > 1:  # one rank's stripe: the tallest of them
            factor = structure.vae_scale_factor
            multiple = 2 ** (len(structure.unet.config.block_out_channels) - 1)
            try:
                bounds = stripe_bounds(stage.height // factor, request.nproc, multiple)
            except StripeLayoutError as error:
                raise GenerationError(str(error)) from error
            height = max(stop - start for start, stop in bounds) * factor
        sizes.append((stage.width, height))
    plan = planner.plan(
        sizes,
        budget=request.max_memory,
        guidance=request.guidance > 1.0,
        encodes=[stage.strength is not None for stage in stages],
        host_budget=request.host_memory,
        unet_calls=calls,
        refuse=False,
    )
    return PlannedRun(request, tuple(stages), tuple(calls), plan, request.nproc, vae_attention)


__all__ = [
    "EFFICIENCY",
    "GPUS",
    "GPU_LINKS",
    "LINKS",
    "LINK_EFFICIENCY",
    "PlanRequest",
    "PlannedRun",
    "make_plan",
    "validate",
]
