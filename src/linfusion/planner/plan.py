"""The typed memory plan: what each phase and stage costs, the whole run's plan, and the refusal.

Plain values, no measuring and no search: :class:`PhaseCost` (one way to run a phase), :class:`StagePlan`
(one stage's chosen savers, peaks and FLOPs), :class:`MemoryPlan` (what the pipelines take as
``memory_plan``), and :class:`MemoryBudgetError` with the message :func:`refusal` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from ..io import format_size, size_flag
from ..patches.stage import Savers


class MemoryBudgetError(UserError, MemoryError):
    """No combination of savers fits the budget; the message gives the smallest budgets that would."""

    def __init__(self, message: str, plan: MemoryPlan | None = None) -> None:
        super().__init__(message)
        self.plan = plan  # the closest plan (smallest device peak), for callers that show it


@dataclass(frozen=True)
class PhaseCost:
    """One way to run a phase (the UNet's denoising, or the VAE) of a stage, and what it costs."""

    savers: Savers
    device: int  # activation bytes on the device, allocator overhead included
    host: int  # bytes parked in host memory meanwhile (skip tensors, stores)
    flops: int  # floating-point operations of the phase over the whole stage
    moved: int = 0  # bytes copied between the device and the host over the whole stage, both directions


@dataclass(frozen=True)
class StagePlan:
    """One stage's size, the savers chosen for it, and what it needs on the device and the host."""

    width: int
    height: int
    savers: Savers
    weights: int
    unet_activations: int
    vae_activations: int
    unet_weights: int = 0  # the UNet's (and ControlNet's) share of ``weights``
    vae_weights: int = 0
    unet_host: int = 0  # parked in host memory while the UNet runs
    vae_host: int = 0
    flops: int = 0  # of the stage as planned (UNet calls, VAE decode and encode)
    plain_flops: int = 0  # of the same stage without any saver
    # bytes copied between the device and the host (both directions summed) over the whole stage: parked
    # skips, the banded UNet's and the tiled VAE's host stores, the weights moved by model CPU offload
    transfer_bytes: int = 0
    # with the prompt encoded on the CPU: the float32 copy of half-precision text encoders held meanwhile
    text_cpu_extra: int = 0

    @property
    def peak(self) -> int:
        """Device bytes at the stage's busiest moment, weights included."""
        if self.savers.model_offload:  # each phase holds only its own model (text encoders: their weights)
            return max(
                self.unet_weights + self.unet_activations,
                self.vae_weights + self.vae_activations,
                0 if self.savers.text_encoder_on_cpu else self.text_weights,
            )
        return self.weights + max(self.unet_activations, self.vae_activations)

    @property
    def text_weights(self) -> int:
        """The text encoders' share of ``weights`` (all that is neither the denoiser nor the VAE)."""
        return self.weights - self.unet_weights - self.vae_weights

    @property
    def host_peak(self) -> int:
        """Host bytes the stage parks at once (model offload also parks the idle models' weights; with the
        prompt encoded on the CPU, every model is in host memory while it is encoded)."""
        idle_unet = self.weights - self.unet_weights if self.savers.model_offload else 0
        idle_vae = self.weights - self.vae_weights if self.savers.model_offload else 0
        text_phase = self.weights + self.text_cpu_extra if self.savers.text_encoder_on_cpu else 0
        return max(self.unet_host + idle_unet, self.vae_host + idle_vae, text_phase)

    def to_json(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "device_peak_bytes": self.peak,
            "host_peak_bytes": self.host_peak,
            "flops": self.flops,
            "plain_flops": self.plain_flops,
            "transfer_bytes": self.transfer_bytes,
            "savers": [] if self.savers == Savers() else self.savers.names(),
        }


@dataclass(frozen=True)
class MemoryPlan:
    """The plan of a whole run (one :class:`StagePlan` per stage), what the pipelines take as ``memory_plan``."""

    budget: int
    device: torch.device
    stages: tuple[StagePlan, ...] = ()
    host_budget: int | None = None  # None: host memory not limited (the device is the host, or no limit)

    @property
    def peak(self) -> int:
        return max(stage.peak for stage in self.stages)

    @property
    def host_peak(self) -> int:
        return max(stage.host_peak for stage in self.stages)

    @property
    def fits(self) -> bool:
        host_fits = self.host_budget is None or self.host_peak <= self.host_budget
        return self.peak <= self.budget and host_fits

    @property
    def flops(self) -> int:
        return sum(stage.flops for stage in self.stages)

    def describe(self) -> str:
        host = "" if self.host_budget is None else f", host budget {format_size(self.host_budget)}"
        lines = [f"memory plan for {self.device.type} (budget {format_size(self.budget)}{host}):"]
        for index, stage in enumerate(self.stages, start=1):
            parked = f", host {format_size(stage.host_peak)}" if stage.host_peak else ""
            if stage.transfer_bytes:
                parked += f", {format_size(stage.transfer_bytes)} moved to and from the host"
            lines.append(
                f"  stage {index} {stage.width}x{stage.height}: peak ~{format_size(stage.peak)}{parked} "
                f"(weights {format_size(stage.weights)}, UNet {format_size(stage.unet_activations)}, "
                f"VAE {format_size(stage.vae_activations)}); savers: {', '.join(stage.savers.names())}"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The plan as plain data (what ``linfusion plan --json`` prints)."""
        return {
            "fits": self.fits,
            "device": self.device.type,
            "device_budget_bytes": self.budget,
            "host_budget_bytes": self.host_budget,
            "device_peak_bytes": self.peak,
            "host_peak_bytes": self.host_peak,
            "flops": self.flops,
            "stages": [stage.to_json() for stage in self.stages],
        }


def refusal(plan: MemoryPlan) -> str:
    """Why ``plan`` does not fit, and the smallest budgets that would."""
    host = ""
    if plan.host_budget is not None:
        host = f" and a host budget of about {format_size(plan.host_peak)} (--host-memory {size_flag(plan.host_peak)})"
    return (
        f"estimated peak {format_size(plan.peak)} on the device (host {format_size(plan.host_peak)}) does not fit "
        f"the budget of {format_size(plan.budget)}"
        + (f" and {format_size(plan.host_budget)} of host memory" if plan.host_budget is not None else "")
        + f" even with every saver on; the smallest workable budget is about {format_size(plan.peak)} "
        f"(pass --max-memory {size_flag(plan.peak)}{host}, or a smaller size)\n" + plan.describe()
    )


__all__ = ["MemoryBudgetError", "MemoryPlan", "PhaseCost", "StagePlan", "refusal"]
