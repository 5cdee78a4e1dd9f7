"""Planning a request without running it: the stages, each one's device and host peak, savers, FLOPs and a
predicted time on a named GPU. What ``linfusion plan`` prints; it needs neither the device nor weights.

The pipeline is built on the ``meta`` device from its configs (:func:`~linfusion.app.loading.load_structure`),
so a plan for an 80 GB GPU can be made on a laptop. Times are *predictions*, never measurements: FLOPs
divided by the GPU's published peak dense fp16/bf16 (tf32 for fp32) throughput times :data:`EFFICIENCY`,
plus the bytes the stage moves between host and device divided by the link's rate (:data:`LINKS` times
:data:`LINK_EFFICIENCY`), the two added (no overlap assumed). A plan that encodes the prompt on the CPU
(a PixArt T5-XXL larger than the device) adds that encode's FLOPs at this machine's CPU rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..choices import BUNDLED_MODEL_NAME, VAE_ATTENTION_CHOICES
from ..io import format_size
from ..pipelines.chain import Stage
from ..planner import MemoryPlan
from .params import GenerationError, GenerationParams
from .timing import CPU_EFFICIENCY, EFFICIENCY, GPU_LINKS, GPUS, LINK_EFFICIENCY, LINKS

DTYPE_NAMES = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float32": "float32", "fp32": "float32"}  # fmt: skip


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: the model, the final size and recipe, the device, the budgets (bytes; None: the
    defaults of :mod:`linfusion.app.prepare`)."""

    model: str = BUNDLED_MODEL_NAME
    width: int = 1024
    height: int = 1024
    mode: str = "sdedit"  # plain, sdedit or demofusion
    device: str = "cuda"
    dtype: str = "auto"  # auto: float16 on a GPU, float32 on the CPU (as linfusion generate runs)
    max_memory: int | None = None
    host_memory: int | None = None
    steps: int = 25
    guidance: float = 7.5
    nproc: int = 1
    gpu: str = "h100"
    linfusion: bool = True
    vae_attention: str = "auto"  # exact, linear, or auto: what ``linfusion generate`` would pick
    link: str | None = None  # the host<->device link of the predicted transfers (None: the GPU's own)

    @property
    def dtype_name(self) -> str:
        """The dtype planned, ``auto`` settled: float16 on a GPU, float32 on the CPU."""
        if self.dtype == "auto":
            return "float32" if self.on_cpu else "float16"
        return DTYPE_NAMES[self.dtype]

    @property
    def on_cpu(self) -> bool:
        """A plan for the CPU: its time is predicted for this machine's CPU, not for a GPU."""
        return self.device == "cpu"


@dataclass(frozen=True)
class PlannedRun:
    """A plan with the stages it was made for and how many UNet calls each runs."""

    request: PlanRequest
    stages: tuple[Stage, ...]
    unet_calls: tuple[int, ...]
    plan: MemoryPlan
    stripes: int  # processes sharing each stage (the plan is one rank's)
    vae_attention: str  # the VAE mid-block kernel planned (auto settled)
    planner: Any = None  # the MemoryPlanner that made the plan (for the per-call FLOPs of the JSON)

    def call_flops(self) -> list[dict[str, int]]:
        """Per stage: FLOPs of one denoiser call at the stage's size (both CFG branches when guided) with
        the model's softmax self-attention and with LinFusion's, whichever the plan runs."""
        if self.planner is None:
            return []
        guided = self.request.guidance > 1.0
        return [
            {attention: self.planner.call_flops(stage.width, stage.height, attention, guided)
             for attention in ("softmax", "linfusion")}
            for stage in self.stages
        ]  # fmt: skip

    @property
    def link(self) -> str:
        return self.request.link or GPU_LINKS[self.request.gpu]

    def transfer_seconds(self) -> list[float]:
        """Each stage's predicted host<->device copy time (transfer bytes / (link x LINK_EFFICIENCY)); none
        on the CPU, where nothing crosses a link."""
        if self.request.on_cpu:
            return [0.0 for _ in self.plan.stages]
        rate = LINKS[self.link] * LINK_EFFICIENCY
        return [stage.transfer_bytes / rate for stage in self.plan.stages]

    def throughput(self) -> float:
        """FLOP/s predicted: ``request.gpu``'s peak x EFFICIENCY, or on the CPU this machine's measured rate."""
        if self.request.on_cpu:
            import torch

            from .timing import sustained_rate

            rate = sustained_rate(torch.device("cpu"), torch.float32)
            assert rate is not None  # the CPU's rate is always measured
            return rate
        return GPUS[self.request.gpu].peak[self.request.dtype_name] * EFFICIENCY

    def predicted_on(self) -> str:
        """Where the time is predicted, for people."""
        if self.request.on_cpu:
            return f"this machine's CPU at {CPU_EFFICIENCY:.0%} of its measured matrix-multiply rate"
        gpu = GPUS[self.request.gpu]
        return (
            f"one {gpu.name} at {EFFICIENCY:.0%} of its {gpu.peak[self.request.dtype_name] / 1e12:.0f} TFLOP/s "
            f"peak, host<->device transfers over {self.link} at {LINK_EFFICIENCY:.0%} of "
            f"{LINKS[self.link] / 1e9:.0f} GB/s, not overlapped"
        )

    def text_encode_seconds(self) -> list[float]:
        """Each stage's predicted time encoding the prompt on the CPU, where the plan keeps the text encoders
        there: their FLOPs at this machine's measured matrix-multiply rate in the plan's dtype times
        CPU_EFFICIENCY (the CPU the plan is made on stands for the GPU's host). Elsewhere 0: an encode on
        the device is not counted."""
        on_cpu = [stage.savers.text_encoder_on_cpu for stage in self.plan.stages]
        if self.planner is None or not any(on_cpu):
            return [0.0 for _ in on_cpu]
        import torch

        from ..patches.stage import cpu_encode_dtype
        from .timing import cpu_matmul_rate

        rate = cpu_matmul_rate(cpu_encode_dtype(getattr(torch, self.request.dtype_name))) * CPU_EFFICIENCY
        seconds = self.planner.text_encoder_flops(self.request.guidance > 1.0) / rate
        return [seconds if kept else 0.0 for kept in on_cpu]

    def predicted_seconds(self) -> list[float]:
        """Each stage's predicted time on ``request.gpu`` (or this CPU): FLOPs / throughput plus its transfer
        seconds (no overlap assumed) plus its prompt encoding on the CPU, if the plan puts it there."""
        throughput = self.throughput()
        extra = [moved + text for moved, text in zip(self.transfer_seconds(), self.text_encode_seconds())]
        return [stage.flops / throughput + more for stage, more in zip(self.plan.stages, extra)]

    def to_json(self) -> dict[str, Any]:
        data = self.plan.to_json()
        rows = zip(
            data["stages"], self.stages, self.unet_calls, self.predicted_seconds(), self.transfer_seconds()
        )
        for entry, stage, calls, predicted, moved in rows:
            entry.update(
                strength=stage.strength, unet_calls=calls, predicted_seconds=predicted, transfer_seconds=moved
            )
        for entry, flops in zip(data["stages"], self.call_flops()):
            entry["call_flops"] = flops
        data.update(
            model=self.request.model,
            mode=self.request.mode,
            dtype=self.request.dtype_name,
            nproc=self.stripes,
            vae_attention=self.vae_attention,
            prediction=(
                {"cpu": "this machine", "efficiency": CPU_EFFICIENCY, "predicted": True}
                if self.request.on_cpu
                else {
                    "gpu": GPUS[self.request.gpu].name,
                    "efficiency": EFFICIENCY,
                    "link": self.link,
                    "link_bytes_per_second": LINKS[self.link],
                    "link_efficiency": LINK_EFFICIENCY,
                    "predicted": True,
                }
            ),
        )
        if not self.plan.fits:
            data["smallest_device_budget_bytes"] = self.plan.peak
            data["smallest_host_budget_bytes"] = self.plan.host_peak
        return data

    def describe(self) -> str:
        request, plan = self.request, self.plan
        rank = f", one rank of {self.stripes} (its stripe of every stage)" if self.stripes > 1 else ""
        host = "" if plan.host_budget is None else f", host {format_size(plan.host_budget)}"
        lines = [
            f"plan: {request.model}, {request.mode} to {request.width}x{request.height}, "
            f"{request.dtype_name} on {request.device}, LinFusion {'on' if request.linfusion else 'off'}, "
            f"VAE attention {self.vae_attention}{rank}",
            f"budgets: device {format_size(plan.budget)}{host}",
        ]
        timed = zip(
            plan.stages, self.predicted_seconds(), self.transfer_seconds(), self.text_encode_seconds()
        )
        for index, (planned, seconds, moved, text) in enumerate(timed):
            parked = format_size(planned.host_peak) if planned.host_peak else "0"
            transfers = (
                f", {format_size(planned.transfer_bytes)} host<->device ({moved:.1f} s of it)"
                if planned.transfer_bytes
                else ""
            )
            if planned.savers.text_encoder_on_cpu:
                transfers += f", prompt encoded on this machine's CPU ({text:.1f} s of it)"
            lines.append(
                f"  stage {index + 1} {planned.width}x{planned.height}: device {format_size(planned.peak)}, "
                f"host {parked}, {planned.flops:.3g} FLOPs ({planned.flops / max(planned.plain_flops, 1):.2f}x "
                f"plain), predicted {seconds:.1f} s{transfers}; savers: {', '.join(planned.savers.names())}"
            )
        total = sum(self.predicted_seconds())
        lines.append(
            f"{'fits' if plan.fits else 'does NOT fit'}: device peak {format_size(plan.peak)}, host peak "
            f"{format_size(plan.host_peak)}; {plan.flops:.3g} FLOPs in all, predicted {total:.0f} s on "
            f"{self.predicted_on()} (a prediction, not a measurement)"
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
    if request.dtype != "auto" and request.dtype not in DTYPE_NAMES:
        raise GenerationError(f"unknown dtype {request.dtype!r}; choose float16, bfloat16 or float32")
    if request.vae_attention not in VAE_ATTENTION_CHOICES:
        raise GenerationError(
            f"unknown VAE attention {request.vae_attention!r}; choose {', '.join(VAE_ATTENTION_CHOICES)}"
        )
    if request.nproc < 1:
        raise GenerationError(f"--nproc must be >= 1; got {request.nproc}")
    if request.steps < 1:
        raise GenerationError(f"--steps must be >= 1; got {request.steps}")


def make_plan(request: PlanRequest) -> PlannedRun:
    """Build the model's structure on ``meta`` and prepare the request on it, for one rank."""
    import torch

    from ..planner import MemoryPlanner
    from .loading import load_structure
    from .prepare import Budgets, prepare

    validate(request)
    dtype = getattr(torch, request.dtype_name)
    if request.max_memory is None and request.device.startswith("cuda") and not torch.cuda.is_available():
        raise GenerationError("no CUDA device here to read the free memory of: pass --max-memory (e.g. 12GB)")
    structure = load_structure(request.model, dtype)
    if not request.linfusion:
        from ..model import denoiser_of, mounted_on

        mounted = mounted_on(denoiser_of(structure))
        if mounted is not None:
            mounted.unmount()
    params = GenerationParams(
        "plan", width=request.width, height=request.height, steps=request.steps, guidance=request.guidance,
        model=request.model, mode=request.mode, vae_attention=request.vae_attention,
    )  # fmt: skip
    planner = MemoryPlanner(structure, device=request.device, dtype=dtype)
    run = prepare(
        params, structure, Budgets(request.max_memory, request.host_memory), device=request.device,
        dtype=dtype, refuse=False, stripes=request.nproc, planner=planner,
    )  # fmt: skip
    return PlannedRun(
        request, run.stages, run.unet_calls, run.memory, request.nproc, run.vae_attention, planner
    )


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
