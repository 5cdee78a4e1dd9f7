"""The models a ``linfusion ui`` was started with: loaded once and kept, planned on ``meta`` copies.

A job applies LinFusion, the VAE attention kernel and the sampler it asks for to the loaded pipeline as one
:class:`~linfusion.patches.Patch` (:meth:`ModelShelf.prepared`) and removes it after. Memory plans are
traced on a meta-device copy of the model in the state the request asks for (:meth:`ModelShelf.planning`),
so a plan can be shown while a job runs without touching the pipeline that job is using.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from ..app.checks import machine_memory
from ..app.loading import (
    LoadedPipeline,
    attach_linfusion,
    load_pipeline,
    resolve_device,
    resolve_dtype,
    resolve_model,
    use_scheduler,
)
from ..app.params import GenerationError, GenerationParams
from ..errors import UserError
from ..model import LinFusion, denoiser_of
from ..patches.base import Patch
from ..patches.vae_attention import apply_vae_attention
from ..pipelines.chain import native_long_side
from ..pipelines.dit import max_sequence_length
from ..planner import MemoryPlanner
from .preview import LatentPreview, fit_latent_preview

logger = logging.getLogger(__name__)


@dataclass
class PlanningModel:
    """A planner for one model in one state (LinFusion on or off, a VAE kernel), on meta copies."""

    planner: MemoryPlanner
    view: Any  # the meta models the planner reads (unet or transformer, vae, text encoders, vae_scale_factor)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one trace at a time on the meta models


@dataclass
class ModelSlot:
    """One model named at start: its pipeline (loaded once), its LinFusion (or why there is none)."""

    name: str
    pipe: Any
    linfusion: LinFusion | None
    linfusion_error: str | None
    scheduler: Any  # the model's own scheduler, put back after every job
    scheduler_name: str  # as the Sampler choices name it
    planning: dict[tuple[bool, str], PlanningModel] = field(default_factory=dict)
    preview: LatentPreview | None = None  # fitted on the first job (:meth:`ModelShelf.latent_preview`)

    @property
    def native(self) -> int:
        """The side in pixels of the images the model was trained at."""
        return native_long_side(self.pipe)


def open_device(name: str) -> torch.device:
    """The ``--device`` to run on (``auto``: CUDA when present); :class:`UserError` when there is none."""
    try:
        device = resolve_device(name)
    except GenerationError as error:
        raise UserError(f"--device {name}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA device (use cpu)")
    return device


class ModelShelf:
    """The models of one server on one device: loading, planning copies, a job's patches."""

    def __init__(self, models: Sequence[str], device: str = "auto") -> None:
        if not models:
            raise UserError("name at least one model")
        self.model_names = list(dict.fromkeys(models))
        self.device = open_device(device)
        self.dtype = resolve_dtype("auto", self.device)
        self._slots: dict[str, ModelSlot] = {}
        self._load_lock = threading.Lock()
        self._planning_lock = threading.Lock()  # guards the planners of every slot

    def device_memory(self) -> int:
        """All the memory of the device (bytes): the GPU's, or this machine's on the CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory)
        return machine_memory()

    def load_all(self) -> None:
        """Load every model named at start (so a bad name fails at start, not on the first job)."""
        for name in self.model_names:
            self.slot(name)

    def slot(self, name: str) -> ModelSlot:
        """The model ``name`` (one named at start), loaded on first use."""
        if name not in self.model_names:
            raise UserError(
                f"model {name!r} is not one this server was started with ({', '.join(self.model_names)})"
            )
        with self._load_lock:
            if name not in self._slots:
                self._slots[name] = self._load(name)
            return self._slots[name]

    def _load(self, name: str) -> ModelSlot:
        source = resolve_model(name)
        pipe = load_pipeline(source, self.device, self.dtype)
        pipe.set_progress_bar_config(disable=True)
        linfusion, reason = None, None
        try:
            linfusion = attach_linfusion(pipe, source, "auto")
        except (GenerationError, LookupError, OSError) as error:  # the model runs, without LinFusion
            reason = str(error)
            logger.warning("model %s: LinFusion is not available (%s)", name, reason)
        if linfusion is not None:
            linfusion.unmount()  # each job that asks for LinFusion mounts it for its run
        return ModelSlot(name, pipe, linfusion, reason, pipe.scheduler, use_scheduler(pipe, None))

    def planning(self, slot: ModelSlot, linfusion: bool, vae_attention: str) -> PlanningModel:
        """A planner for the model in the requested state, traced on meta copies (the pipeline is untouched).

        Planners are kept (each caches its traces by size), so a plan shown once is instant for the job.
        """
        key = (linfusion, vae_attention)
        with self._planning_lock:
            if key not in slot.planning:
                view = self.planning_view(slot, linfusion, vae_attention)
                planner = MemoryPlanner(view, device=self.device, dtype=self.dtype)
                slot.planning[key] = PlanningModel(planner, view)
            return slot.planning[key]

    def planning_view(self, slot: ModelSlot, linfusion: bool, vae_attention: str) -> SimpleNamespace:
        """The models a planner reads, as meta copies in the requested state: the denoiser (``unet``, or a
        DiT's ``transformer``) with LinFusion mounted or not, the VAE with its kernel, the text encoders."""
        pipe = slot.pipe
        denoiser = denoiser_of(pipe)
        slot_name = "unet" if getattr(pipe, "unet", None) is denoiser else "transformer"
        with torch.device("meta"):  # the planner's own copies: patched here, never restored
            copy = type(denoiser).from_config(denoiser.config).to(self.dtype)
            vae = type(pipe.vae).from_config(pipe.vae.config).to(self.dtype)
            if linfusion and slot.linfusion is not None:
                LinFusion(modules_list=slot.linfusion.config.modules_list).mount(copy)
        apply_vae_attention(vae, vae_attention)
        extra = {"max_sequence_length": max_sequence_length(pipe)} if slot_name == "transformer" else {}
        return SimpleNamespace(
            **{slot_name: copy},
            **extra,
            vae=vae,
            tokenizer=pipe.tokenizer,
            text_encoder=getattr(pipe, "text_encoder", None),
            text_encoder_2=getattr(pipe, "text_encoder_2", None),
            vae_scale_factor=pipe.vae_scale_factor,
        )

    def latent_preview(self, slot: ModelSlot) -> LatentPreview:
        """The model's latent-to-RGB preview map, fitted on its VAE the first time (call between jobs)."""
        if slot.preview is None:
            slot.preview = fit_latent_preview(slot.pipe.vae)
        return slot.preview

    @contextlib.contextmanager
    def prepared(self, slot: ModelSlot, params: GenerationParams) -> Iterator[LoadedPipeline]:
        """The loaded pipeline with LinFusion, VAE attention and sampler as ``params`` asks, all undone after."""
        pipe = slot.pipe
        patch = Patch("web UI job")
        try:
            with patch:
                if params.linfusion != "none" and slot.linfusion is not None:
                    patch.add(slot.linfusion.mount(pipe))
                patch.add(apply_vae_attention(pipe.vae, params.vae_attention))
                if params.scheduler != slot.scheduler_name:
                    patch.on_remove(lambda: setattr(pipe, "scheduler", slot.scheduler))
                    use_scheduler(pipe, params.scheduler)
                yield LoadedPipeline(pipe, self.device, params, patch)
        except torch.cuda.OutOfMemoryError as error:
            raise UserError(
                "the device ran out of memory (more than the plan estimated on this machine): enter a smaller "
                "memory budget, which turns on more savers, or choose a smaller size"
            ) from error
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the next plan's "free memory" budget sees what this job let go


__all__ = ["ModelShelf", "ModelSlot", "PlanningModel", "open_device"]
