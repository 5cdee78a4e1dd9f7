"""The memory planner: estimate each stage's peak, switch on only the savers it needs, refuse early.

Estimates come from running the real program on the ``meta`` device: the UNet (with LinFusion and the
chosen savers) and the VAE (plain or exactly tiled) are rebuilt from their configs on ``meta`` and called
under a dispatch mode that counts the bytes of live tensors (and torch's flop counter for FLOPs). Nothing
is computed, and every saver is accounted for exactly as it changes the program. Stages up to
``TRACE_LIMIT_TOKENS`` latent tokens are traced at their own size; larger ones at a few smaller sizes of
the same aspect ratio, extended as a polynomial in pixels (:class:`Extrapolated`), so that a 16K stage is
planned in seconds. Each stage also gets a host budget (what is parked off the device) and its FLOPs.
Device allocators add overhead on top of live tensors; ``OVERHEAD`` holds the correction per device
type (CPU: fitted on RSS high-water marks of fresh processes, see docs/high-resolution.md).

:func:`apply_savers` is the one place that turns a stage's :class:`Savers` into patches on a pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .errors import UserError
from .io import MIB, format_size, size_flag
from .model import LinFusion, mounted_on
from .patches.banded_unet import (
    UNetCost,
    UnsupportedUNet,
    apply_banded_unet,
    banded_unet_cost,
    check_banded_unet,
)
from .patches.base import Patch
from .patches.savers import apply_memory_savers
from .patches.tiling import apply_exact_tiling
from .patches.vae_attention import apply_vae_attention
from .tiled_vae import ExactTiler, StoreBudgetError, UnsupportedVAE, tiled_vae_cost
from .tracing import traced_flops, traced_peak
from .vae_attention import vae_attention_mode

# real peak ~= scale * traced live bytes + constant. CPU: fitted on RSS high-water marks (2 cores, torch
# 2.13, oneDNN convolutions). CUDA: not measured yet; the allocator's max_memory_allocated counts live
# tensors plus library workspaces, so a 10 % + 512 MiB margin is used until a GPU run calibrates it.
OVERHEAD = {"cpu": (1.1, 64 * MIB), "cuda": (1.1, 512 * MIB)}
# Requests larger than this (16384 x 16384) that the analytic lower bound already rules out are refused
# without planning; smaller ones are planned in full, so that the refusal names the smallest budgets.
MAX_PLANNED_PIXELS = 16384 * 16384
FEED_FORWARD_CHUNK = 4096
DEFAULT_BAND_BYTES = 256 * MIB
BANDED_MARGIN = 1024 * MIB  # device bytes kept free of a banded UNet's store (bands, library workspaces)


class MemoryBudgetError(UserError, MemoryError):
    """No combination of savers fits the budget; the message gives the smallest budgets that would."""

    def __init__(self, message: str, plan: MemoryPlan | None = None) -> None:
        super().__init__(message)
        self.plan = plan  # the closest plan (smallest device peak), for callers that show it


def available_memory(device: torch.device) -> int:
    """Free memory of ``device``: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read available memory from /proc/meminfo; pass --max-memory")


@dataclass(frozen=True)
class Savers:
    """What the plan turns on. Each is exact (same image); each costs some speed."""

    sequential_cfg: bool = False
    feed_forward_chunk: int | None = None
    skip_offload: bool = False
    tiled_vae: bool = False
    model_offload: bool = False  # only the model at work on the device (diffusers' model CPU offload)
    banded_unet: bool = False  # the UNet layer by layer over row bands (exact, bounded memory)
    unet_store_on_host: bool = False  # the banded UNet's whole activations in host memory
    unet_device_store_bytes: int | None = None  # ... of which this many bytes may stay on the device
    vae_store_on_host: bool = False  # the tiled VAE's store in host memory ...
    vae_store_limit_bytes: int | None = None  # ... holding at most this many bytes (None: no limit)
    vae_device_store_bytes: int = 0  # ... of which this many stay on the device

    def names(self) -> list[str]:
        names = []
        if self.banded_unet:
            where = "on the device"
            if self.unet_store_on_host:
                kept = format_size(self.unet_device_store_bytes or 0)
                where = (
                    f"on the host ({kept} kept on the device)"
                    if self.unet_device_store_bytes
                    else "on the host"
                )
            names.append(f"banded UNet, activations {where}")
        if self.sequential_cfg:
            names.append("CFG branches one at a time")
        if self.feed_forward_chunk:
            names.append(f"feed-forward in chunks of {self.feed_forward_chunk} tokens")
        if self.skip_offload:
            names.append("skip tensors parked on the CPU")
        if self.tiled_vae:
            where = "host" if self.vae_store_on_host else "device"
            limit = (
                f", at most {format_size(self.vae_store_limit_bytes)}"
                if self.vae_store_limit_bytes is not None
                else ""
            )
            names.append(f"exact tiled VAE (store on the {where}{limit})")
        if self.model_offload:
            names.append("model CPU offload")
        return names or ["none needed"]


@dataclass(frozen=True)
class PhaseCost:
    """One way to run a phase (the UNet's denoising, or the VAE) of a stage, and what it costs."""

    savers: Savers
    device: int  # activation bytes on the device, allocator overhead included
    host: int  # bytes parked in host memory meanwhile (skip tensors, stores)
    flops: int  # floating-point operations of the phase over the whole stage


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

    @property
    def peak(self) -> int:
        """Device bytes at the stage's busiest moment, weights included."""
        if self.savers.model_offload:  # each phase holds only its own model (text encoders: their weights)
            return max(
                self.unet_weights + self.unet_activations,
                self.vae_weights + self.vae_activations,
                self.weights - self.unet_weights - self.vae_weights,
            )
        return self.weights + max(self.unet_activations, self.vae_activations)

    @property
    def host_peak(self) -> int:
        """Host bytes the stage parks at once (model offload also parks the idle models' weights)."""
        idle_unet = self.weights - self.unet_weights if self.savers.model_offload else 0
        idle_vae = self.weights - self.vae_weights if self.savers.model_offload else 0
        return max(self.unet_host + idle_unet, self.vae_host + idle_vae)

    def to_json(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "device_peak_bytes": self.peak,
            "host_peak_bytes": self.host_peak,
            "flops": self.flops,
            "plain_flops": self.plain_flops,
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


class Extrapolated:
    """A quantity measured on ``meta`` at small sizes and extended to large ones as a polynomial in pixels.

    Activation bytes grow linearly with the pixel count (LinFusion, fused softmax attention, chunked
    feed-forward beyond one chunk, tiled VAE bands beyond one band) and FLOPs as a polynomial of degree 2
    at most (softmax attention). Tracing a 16K stage op by op would take minutes (chunked layers run
    thousands of chunks), so beyond ``limit`` latent tokens the quantity is measured at ``degree + 1``
    smaller sizes of the same aspect ratio and the polynomial through them is evaluated at the target;
    at ``limit`` or below it is measured at the size itself. Measurements are cached per size.
    """

    def __init__(self, measure: Callable[[int, int], int], multiple: int, degree: int, limit: int) -> None:
        self.measure = measure
        self.multiple = multiple  # sizes must be multiples of this many pixels
        self.degree = degree
        self.limit = limit  # latent tokens
        self._cache: dict[tuple[int, int], int] = {}

    def _at(self, width: int, height: int) -> int:
        if (width, height) not in self._cache:
            self._cache[(width, height)] = self.measure(width, height)
        return self._cache[(width, height)]

    def __call__(self, width: int, height: int, tokens_per_pixel: float) -> int:
        if width * height * tokens_per_pixel <= self.limit:
            return self._at(width, height)
        points = []
        for index in range(self.degree + 1):
            tokens = self.limit * (index + 1) / (self.degree + 1)
            scale = (tokens / (width * height * tokens_per_pixel)) ** 0.5
            size = (self._round(width * scale), self._round(height * scale))
            if size not in [p[0] for p in points]:
                points.append((size, self._at(*size)))
        return int(round(_polynomial_through([(w * h, v) for (w, h), v in points], width * height)))

    def _round(self, value: float) -> int:
        return max(self.multiple, int(round(value / self.multiple)) * self.multiple)


def _polynomial_through(points: list[tuple[int, int]], x: int) -> float:
    """Lagrange interpolation through ``points`` (x, y), evaluated at ``x`` (in exact fractions)."""
    from fractions import Fraction

    total = Fraction(0)
    for i, (xi, yi) in enumerate(points):
        term = Fraction(yi)
        for j, (xj, _) in enumerate(points):
            if j != i:
                term *= Fraction(x - xj, xi - xj)
        total += term
    return float(total)


# Latent tokens up to which a stage is traced at its own size: memory beyond two feed-forward chunks (so
# chunking is in its linear regime at the reference sizes), FLOPs (exact polynomials) far smaller.
TRACE_LIMIT_TOKENS = 96 * 96
FLOPS_LIMIT_TOKENS = 32 * 32


class MemoryPlanner:
    """Estimates and plans for one pipeline (with or without LinFusion mounted) on one device.

    ``pipe`` may be a loaded pipeline or a structure built on ``meta`` (``app.loading.load_structure``):
    only the models' configs and parameter sizes are read, so a plan needs neither the device nor weights.
    """

    def __init__(self, pipe: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.pipe = pipe
        parameter = next(pipe.unet.parameters())
        self.device = torch.device(device) if device is not None else parameter.device
        self.dtype = dtype or parameter.dtype
        self.linfusion = mounted_on(pipe.unet)
        self.vae_factor = pipe.vae_scale_factor
        self._meta_unet: Any = None
        self._meta_vaes: dict[str, Any] = {}
        self._measures: dict[tuple, Extrapolated] = {}
        self._banded: dict[tuple, UNetCost] = {}
        self._banded_ok: bool | None = None
        self._tiled: dict[tuple, tuple[int, int, int] | None] = {}

    # ------------------------------------------------------------------ meta models
    def meta_unet(self) -> Any:
        if self._meta_unet is None:
            with torch.device("meta"):
                unet = type(self.pipe.unet).from_config(self.pipe.unet.config).to(self.dtype)
                if self.linfusion is not None:
                    LinFusion(modules_list=self.linfusion.config.modules_list).mount(unet)
            self._meta_unet = unet.eval()
        return self._meta_unet

    def meta_vae(self) -> Any:
        """The VAE on meta, with the mid-block attention kernel the real VAE runs now (exact or linear)."""
        mode = self._vae_mode()
        if mode not in self._meta_vaes:
            with torch.device("meta"):
                vae = type(self.pipe.vae).from_config(self.pipe.vae.config).to(self.dtype).eval()
            if mode == "linear":
                apply_vae_attention(vae, "linear")  # the meta copy is the planner's own: never removed
            self._meta_vaes[mode] = vae
        return self._meta_vaes[mode]

    def _vae_mode(self) -> str:
        return "linear" if vae_attention_mode(self.pipe.vae) == "linear" else "exact"

    def weights(
        self, names: Sequence[str] = ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet")
    ) -> int:
        """Bytes of the parameters and buffers of the pipeline's models named in ``names`` (in the plan's dtype)."""
        total = 0
        for name in names:
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                tensors = [*module.parameters(), *module.buffers()]
                total += sum(
                    t.numel() * (self._itemsize if t.is_floating_point() else t.element_size())
                    for t in tensors
                )
        return total

    @property
    def _itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    # ------------------------------------------------------------------ measured phases
    def unet_inputs(self, height: int, width: int, batch: int) -> tuple[Any, ...]:
        config = self.pipe.unet.config
        latents = torch.empty(batch, config.in_channels, height // self.vae_factor, width // self.vae_factor,
                              device="meta", dtype=self.dtype)  # fmt: skip
        tokens = getattr(getattr(self.pipe, "tokenizer", None), "model_max_length", 77)
        context = torch.empty(batch, tokens, config.cross_attention_dim, device="meta", dtype=self.dtype)
        extra: dict[str, Any] = {}
        if config.get("addition_embed_type") == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.empty(batch, pooled, device="meta", dtype=self.dtype),
                "time_ids": torch.empty(batch, 6, device="meta", dtype=self.dtype),
            }
        return latents, context, extra

    @property
    def _size_multiple(self) -> int:
        """Sizes the UNet accepts: the latent must halve evenly at every downsampling."""
        levels = len(self.pipe.unet.config.block_out_channels) - 1
        return self.vae_factor * 2**levels

    def _extrapolated(
        self, key: tuple, measure: Callable[[int, int], int], degree: int, limit: int = TRACE_LIMIT_TOKENS
    ) -> Extrapolated:
        if key not in self._measures:
            self._measures[key] = Extrapolated(measure, self._size_multiple, degree, limit)
        return self._measures[key]

    @property
    def _tokens_per_pixel(self) -> float:
        return 1.0 / self.vae_factor**2

    def unet_activations(self, width: int, height: int, savers: Savers, guidance: bool = True) -> int:
        """Device bytes of one UNet call's activations with ``savers`` (allocator overhead included)."""
        key = ("unet", replace(savers, tiled_vae=False, model_offload=False), guidance)
        measure = self._extrapolated(key, lambda w, h: self._trace_unet(w, h, savers, guidance), 1)
        return self._with_overhead(measure(width, height, self._tokens_per_pixel))

    def _run_unet(self, width: int, height: int, batch: int) -> Callable[[], Any]:
        unet = self.meta_unet()
        latents, context, extra = self.unet_inputs(height, width, batch)
        timestep = torch.tensor(999, device="meta")
        return lambda: unet(latents, timestep, encoder_hidden_states=context, **extra)

    def _trace_unet(self, width: int, height: int, savers: Savers, guidance: bool) -> int:
        batch = 2 if guidance else 1
        options = {
            "feed_forward_chunk": savers.feed_forward_chunk,
            "sequential_cfg": savers.sequential_cfg,
            "skip_offload": "meta" if savers.skip_offload else None,
        }
        # With skip_offload the parked skips stay on meta in the trace: an upper bound for the device.
        with apply_memory_savers(self.meta_unet(), **options):
            live = traced_peak(self._run_unet(width, height, batch))
        return (
            live + 3 * batch * 4 * (height // self.vae_factor) * (width // self.vae_factor) * self._itemsize
        )

    def skip_bytes(self, width: int, height: int, guidance: bool = True) -> int:
        """Bytes of the skip tensors the down blocks hand to the up blocks (what skip offload parks)."""
        key = ("skips", guidance)

        def measure(w: int, h: int) -> int:
            latents, context, extra = self.unet_inputs(h, w, 2 if guidance else 1)
            total = 0

            def count(module: Any, args: Any, output: Any) -> None:
                nonlocal total
                if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], tuple):
                    total += sum(t.numel() * t.element_size() for t in output[1])

            unet = self.meta_unet()
            handles = [block.register_forward_hook(count) for block in unet.down_blocks]
            try:
                with torch.no_grad():
                    unet(latents, torch.tensor(999, device="meta"), encoder_hidden_states=context, **extra)
            finally:
                for handle in handles:
                    handle.remove()
            return total

        return self._extrapolated(key, measure, 1)(width, height, self._tokens_per_pixel)

    def unet_flops(self, width: int, height: int, guidance: bool = True) -> int:
        """FLOPs of one UNet call (both guidance branches when ``guidance``)."""
        key = ("unet flops", guidance)
        measure = self._extrapolated(
            key, lambda w, h: traced_flops(self._run_unet(w, h, 2 if guidance else 1)), 2
        )
        return measure(width, height, self._tokens_per_pixel)

    def vae_activations(self, width: int, height: int, savers: Savers, encode: bool = False) -> int:
        """Device bytes of the VAE decode (and encode, when ``encode``) activations with ``savers``."""
        key = ("vae", savers.tiled_vae, encode, self._vae_mode())
        measure = self._extrapolated(key, lambda w, h: self._trace_vae(w, h, savers, encode), 1)
        return self._with_overhead(measure(width, height, self._tokens_per_pixel))

    def _vae_runs(self, width: int, height: int, tiled: bool) -> tuple[Callable[[], Any], Callable[[], Any]]:
        vae = self.meta_vae()
        latents = torch.empty(1, vae.config.latent_channels, height // self.vae_factor, width // self.vae_factor,
                              device="meta", dtype=self.dtype)  # fmt: skip
        image = torch.empty(1, 3, height, width, device="meta", dtype=self.dtype)
        if tiled:
            tiler = ExactTiler(vae, band_bytes=DEFAULT_BAND_BYTES)
            return (lambda: tiler.decode(latents)), (lambda: tiler.encode_moments(image))
        return (lambda: vae.decode(latents)), (lambda: vae.encode(image))

    def _trace_vae(self, width: int, height: int, savers: Savers, encode: bool) -> int:
        decode, encode_run = self._vae_runs(width, height, savers.tiled_vae)
        live = traced_peak(decode)
        if encode:
            live = max(live, traced_peak(encode_run))
        # the pipeline also holds the decoded image as float and as uint8 (postprocessing)
        return live + 3 * height * width * 4

    def vae_flops(self, width: int, height: int, encode: bool = False) -> int:
        """FLOPs of the plain VAE decode (plus encode when ``encode``)."""
        key = ("vae flops", encode, self._vae_mode())

        def measure(w: int, h: int) -> int:
            decode, encode_run = self._vae_runs(w, h, tiled=False)
            return traced_flops(decode) + (traced_flops(encode_run) if encode else 0)

        return self._extrapolated(key, measure, 2, FLOPS_LIMIT_TOKENS)(width, height, self._tokens_per_pixel)

    def _with_overhead(self, live: int) -> int:
        scale, constant = OVERHEAD.get(self.device.type, OVERHEAD["cuda"])
        return int(scale * live + constant)

    # ------------------------------------------------------------------ planning
    def _unet_ladder(self) -> list[Savers]:
        ladder = [Savers(), Savers(sequential_cfg=True),
                  Savers(sequential_cfg=True, feed_forward_chunk=FEED_FORWARD_CHUNK)]  # fmt: skip
        if self.device.type == "cuda":
            ladder.append(replace(ladder[-1], skip_offload=True))
        return ladder

    def unet_options(
        self, width: int, height: int, guidance: bool, calls: int, room: int
    ) -> Iterator[PhaseCost]:
        """Every way to run the stage's UNet calls, cheapest first, each measured only when asked for.

        First the savers of the plain UNet; then the banded UNet (exact, bounded: its store on the
        device, then, on CUDA, on the host with ``room`` bytes of it kept on the device, then all on the
        host), each with the guidance branches together and one after the other.
        """
        flops = calls * self.unet_flops(width, height, guidance)
        for savers in self._unet_ladder():
            parked = self.skip_bytes(width, height, guidance) if savers.skip_offload else 0
            # the trace keeps the parked skips on meta: an upper bound for the device
            yield PhaseCost(savers, self.unet_activations(width, height, savers, guidance), parked, flops)
        if not self._bandable():
            return
        stores: list[int | None] = [None]  # None: the store on the device
        if self.device.type == "cuda":
            stores += [max(0, room), 0]
        for device_store_bytes in stores:
            for sequential in (False, True) if guidance else (False,):
                cost = self.banded_cost(width, height, guidance, sequential, device_store_bytes)
                savers = Savers(
                    sequential_cfg=sequential,
                    banded_unet=True,
                    unet_store_on_host=device_store_bytes is not None,
                    unet_device_store_bytes=device_store_bytes,
                )
                per_call = cost.flops * (2 if sequential else 1)
                yield PhaseCost(
                    savers, self._with_overhead(cost.device_peak), cost.host_peak, calls * per_call
                )

    def _bandable(self) -> bool:
        if self._banded_ok is None:
            try:
                check_banded_unet(self.meta_unet())
                self._banded_ok = True
            except UnsupportedUNet:
                self._banded_ok = False
        return self._banded_ok

    def banded_cost(
        self, width: int, height: int, guidance: bool, sequential: bool, device_store_bytes: int | None
    ) -> UNetCost:
        """One banded UNet call's cost (cached): both guidance branches, or one when ``sequential``."""
        key = (width, height, guidance, sequential, device_store_bytes)
        if key not in self._banded:
            self._banded[key] = banded_unet_cost(
                self.meta_unet(),
                width,
                height,
                dtype=self.dtype,
                batch=2 if guidance and not sequential else 1,
                band_bytes=DEFAULT_BAND_BYTES,
                store_on_host=device_store_bytes is not None,
                device_store_bytes=device_store_bytes,
                linfusion=self.linfusion is not None,
                vae_scale_factor=self.vae_factor,
                context_tokens=getattr(getattr(self.pipe, "tokenizer", None), "model_max_length", 77),
            )
        return self._banded[key]

    def vae_options(
        self, width: int, height: int, encode: bool, room: int, host_room: int | None
    ) -> Iterator[PhaseCost]:
        """Every way to run the stage's VAE decode (and encode), cheapest first.

        The plain VAE; then the exact tiled VAE (:mod:`linfusion.tiled_vae`, costed analytically): its store
        whole on the device; on CUDA in host memory (``host_room`` bytes, ``room`` of it kept on the
        device); then within ``room`` on the device, recomputing what it cannot keep (more FLOPs); then on
        CUDA within ``host_room`` alone.
        """
        yield PhaseCost(
            Savers(),
            self.vae_activations(width, height, Savers(), encode),
            0,
            self.vae_flops(width, height, encode),
        )
        stores: list[tuple[bool, int | None, int | None]] = [
            (False, None, None)
        ]  # (on host, budget, on device)
        if self.device.type == "cuda" and host_room is not None:
            stores.append((True, host_room + max(0, room), max(0, room)))
        stores.append((False, max(0, room), None))
        if self.device.type == "cuda" and host_room is not None:
            stores.append((True, host_room, 0))
        options = []
        for on_host, store_limit_bytes, on_device in stores:
            cost = self.tiled_vae_cost(width, height, encode, store_limit_bytes, on_device)
            if cost is None:
                continue
            savers = Savers(
                tiled_vae=True, vae_store_on_host=on_host, vae_store_limit_bytes=store_limit_bytes,
                vae_device_store_bytes=on_device or 0,
            )  # fmt: skip
            options.append(PhaseCost(savers, self._with_overhead(cost[0]), cost[1], cost[2]))
        yield from sorted(options, key=lambda option: option.flops)  # stable: the order above on ties

    def tiled_vae_cost(
        self, width: int, height: int, encode: bool, store_limit_bytes: int | None, on_device: int | None
    ) -> tuple[int, int, int] | None:
        """(device bytes, host bytes, FLOPs) of the tiled decode (and encode), or None when the store
        cannot be that small."""
        key = (width, height, encode, store_limit_bytes, on_device, self._vae_mode())
        if key not in self._tiled:
            common = {"dtype": self.dtype, "band_bytes": DEFAULT_BAND_BYTES, "store_limit_bytes": store_limit_bytes,
                      "device_store_bytes": on_device, "attention": self._vae_mode()}  # fmt: skip
            try:
                costs = [tiled_vae_cost(self.pipe.vae.config, width, height, encode=False, **common)]
                if encode:
                    costs.append(tiled_vae_cost(self.pipe.vae.config, width, height, encode=True, **common))
            except StoreBudgetError:
                self._tiled[key] = None
            else:
                postprocessing = 3 * height * width * 4  # the decoded image as float, then as uint8
                device = max(cost.device_peak for cost in costs) + postprocessing
                self._tiled[key] = (
                    device,
                    max(cost.host_peak for cost in costs),
                    sum(c.flops for c in costs),
                )
        return self._tiled[key]

    def minimum_bytes(self, width: int, height: int, encode: bool = False) -> int:
        """A lower bound of what a stage needs in device and host memory together, computed analytically.

        The weights, the decoded image (float, then 8-bit) and the least the exact tiled VAE can keep
        (its store at the smallest budget :func:`~linfusion.tiled_vae.tiled_vae_cost` finds). Anything
        above the budgets cannot run with any saver: refusing on it needs no trace.
        """
        image = 3 * width * height * (4 + 1)
        try:
            tiled_vae_cost(
                self.pipe.vae.config, width, height, dtype=self.dtype, band_bytes=DEFAULT_BAND_BYTES,
                store_limit_bytes=0, encode=encode, attention=self._vae_mode(),
            )  # fmt: skip
            store = 0
        except StoreBudgetError as error:
            store = error.minimum
        except UnsupportedVAE:
            store = 0
        return self.weights() + store + image

    def plan_stage(
        self,
        width: int,
        height: int,
        budget: int,
        guidance: bool = True,
        encode: bool = False,
        unet_calls: int = 1,
        host_budget: int | None = None,
    ) -> StagePlan:
        """The cheapest savers that fit ``budget`` (and ``host_budget``) for one stage.

        The UNet and VAE phases are chosen apart, each the cheapest option (FLOPs, then fewer savers)
        whose device and host bytes fit. Model CPU offload (CUDA only) is the last resort: it keeps only
        the model at work on the device, at the price of moving weights every call. When nothing fits, the
        choice with the smallest device peak is kept, so the plan's peak is the smallest workable budget.
        """
        weights = self.weights()
        unet_weights = self.weights(("unet", "controlnet"))
        vae_weights = self.weights(("vae",))
        host_limit = host_budget if host_budget is not None and self.device.type != "cpu" else None
        plain_flops = unet_calls * self.unet_flops(width, height, guidance) + self.vae_flops(
            width, height, encode
        )

        def choose(options: Iterator[PhaseCost], resident: int, idle: int) -> PhaseCost:
            """The first (cheapest) option that fits, else the one with the smallest device bytes."""
            seen = []
            for option in options:
                host_fits = host_limit is None or option.host + idle <= host_limit
                if resident + option.device <= budget and host_fits:
                    return option
                seen.append((option, host_fits))
            within_host = [option for option, host_fits in seen if host_fits]
            return min(within_host or [option for option, _ in seen], key=lambda option: option.device)

        best: StagePlan | None = None
        for offload in (False, True) if self.device.type == "cuda" else (False,):
            unet_resident = unet_weights if offload else weights
            unet = choose(
                self.unet_options(
                    width, height, guidance, unet_calls, budget - unet_resident - BANDED_MARGIN
                ),
                unet_resident,
                weights - unet_weights if offload else 0,
            )
            vae_resident = vae_weights if offload else weights
            vae_idle = weights - vae_weights if offload else 0
            vae = choose(
                self.vae_options(
                    width,
                    height,
                    encode,
                    budget - vae_resident - BANDED_MARGIN,
                    None if host_limit is None else host_limit - vae_idle - BANDED_MARGIN,
                ),
                vae_resident,
                vae_idle,
            )
            savers = replace(
                unet.savers,
                tiled_vae=vae.savers.tiled_vae,
                vae_store_on_host=vae.savers.vae_store_on_host,
                vae_store_limit_bytes=vae.savers.vae_store_limit_bytes,
                vae_device_store_bytes=vae.savers.vae_device_store_bytes,
                model_offload=offload,
            )
            stage = StagePlan(
                width, height, savers, weights, unet.device, vae.device, unet_weights, vae_weights,
                unet.host, vae.host, unet.flops + vae.flops, plain_flops,
            )  # fmt: skip
            host_fits = host_limit is None or stage.host_peak <= host_limit
            if stage.peak <= budget and host_fits:
                return stage
            if best is None or stage.peak < best.peak:
                best = stage
        assert best is not None
        return best

    def plan(
        self,
        sizes: Sequence[tuple[int, int]],
        budget: int | None = None,
        guidance: bool = True,
        encodes: Sequence[bool] | None = None,
        host_budget: int | None = None,
        unet_calls: Sequence[int] | None = None,
        refuse: bool = True,
    ) -> MemoryPlan:
        """Plan every stage; with ``refuse`` raise :class:`MemoryBudgetError` before anything runs if one
        cannot fit (the message names the smallest budgets that would).

        ``budget`` and ``host_budget`` are bytes (``host_budget`` None: host memory not limited). Without
        ``budget``: the device's free memory plus the weights already loaded on it. ``unet_calls``
        counts each stage's UNet calls (denoising steps, twice for DemoFusion's dilated branch) for FLOPs.
        """
        budget = available_memory(self.device) + self.weights() if budget is None else budget
        host = host_budget
        encodes = list(encodes) if encodes is not None else [False] * len(sizes)
        calls = list(unet_calls) if unet_calls is not None else [1] * len(sizes)
        if refuse:  # a size beyond any plan is refused in milliseconds, before any trace
            # Up to 16K the full plan takes seconds, and its refusal names the smallest workable budgets.
            available = budget + (host or 0 if self.device.type != "cpu" else 0)
            for (width, height), encode in zip(sizes, encodes):
                if width * height <= MAX_PLANNED_PIXELS:
                    continue
                needed = self.minimum_bytes(width, height, encode)
                if needed > available:
                    where = "device and host memory" if self.device.type != "cpu" else "memory"
                    raise MemoryBudgetError(
                        f"{width}x{height} needs at least {format_size(needed)} of {where} whatever the savers "
                        f"(the weights, the smallest store of the exact tiled VAE and the image itself); the "
                        f"budget is {format_size(available)}: choose a smaller size"
                    )
        stages = tuple(
            self.plan_stage(width, height, budget, guidance, encode, call_count, host)
            for (width, height), encode, call_count in zip(sizes, encodes, calls)
        )
        plan = MemoryPlan(budget, self.device, stages, host if self.device.type != "cpu" else None)
        if refuse and not plan.fits:
            raise MemoryBudgetError(refusal(plan), plan)
        return plan


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


def apply_savers(pipe: Any, savers: Savers) -> Patch:
    """Turn on what ``savers`` says on ``pipe`` (UNet savers, exact VAE tiling, model offload).

    The one place a stage plan becomes patches; ``remove()`` restores the pipeline as it was.
    """
    patch = Patch("stage savers")
    try:  # the banded UNet first, then what wraps it; model offload wraps the UNet's forward last
        if savers.banded_unet:
            patch.add(
                apply_banded_unet(
                    pipe.unet,
                    band_bytes=DEFAULT_BAND_BYTES,
                    store_device="cpu" if savers.unet_store_on_host else None,
                    device_store_bytes=savers.unet_device_store_bytes,
                )
            )
        patch.add(
            apply_memory_savers(
                pipe.unet,
                feed_forward_chunk=savers.feed_forward_chunk,
                sequential_cfg=savers.sequential_cfg,
                skip_offload="cpu" if savers.skip_offload else None,
            )
        )
        if savers.tiled_vae:
            patch.add(
                apply_exact_tiling(
                    pipe.vae,
                    band_bytes=DEFAULT_BAND_BYTES,
                    store_device="cpu" if savers.vae_store_on_host else None,
                    store_limit_bytes=savers.vae_store_limit_bytes,
                    device_store_bytes=savers.vae_device_store_bytes,
                )
            )
        if savers.model_offload:
            patch.add(apply_model_offload(pipe))
    except BaseException:
        patch.remove()
        raise
    return patch


def apply_model_offload(pipe: Any) -> Patch:
    """diffusers' model CPU offload (only the model at work on the device); ``remove()`` moves it all back."""
    device = pipe.unet.device
    models = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    attributes = [set(model.__dict__) for model in models]
    pipe.enable_model_cpu_offload(device=device)
    patch = Patch("model CPU offload")

    def undo() -> None:
        pipe.remove_all_hooks()
        pipe.to(device)
        for model, before in zip(models, attributes):  # accelerate leaves its restored forward behind
            for name in set(model.__dict__) - before:
                del model.__dict__[name]

    patch.on_remove(undo)
    return patch
