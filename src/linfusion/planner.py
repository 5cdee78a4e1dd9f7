"""The memory planner: estimate each stage's peak, switch on only the savers it needs, refuse early.

Estimates come from running the real program on the ``meta`` device: the UNet (with LinFusion and the
chosen savers) and the VAE (plain or exactly tiled) are rebuilt from their configs on ``meta`` and called
at the stage's size under a dispatch mode that counts the bytes of live tensors. Nothing is computed, so
a 16K stage is traced in seconds, and every saver is accounted for exactly as it changes the program.
Device allocators add overhead on top of live tensors; ``OVERHEAD`` holds the correction per device
type, measured with ``benchmarks/planner.py`` (CPU: RSS high-water mark, see docs/high-resolution.md).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2**20
GIB = 2**30
# real peak ~= scale * traced live bytes + constant. CPU: fitted on RSS high-water marks (2 cores, torch
# 2.13, oneDNN convolutions). CUDA: not measured yet; the allocator's max_memory_allocated counts live
# tensors plus library workspaces, so a 10 % + 512 MiB margin is used until a GPU run calibrates it.
OVERHEAD = {"cpu": (1.1, 64 * MIB), "cuda": (1.1, 512 * MIB)}
FEED_FORWARD_CHUNK = 4096
DEFAULT_BAND_BYTES = 256 * MIB


class MemoryBudgetError(MemoryError):
    """No combination of savers fits the budget; the message gives the smallest budget that would."""


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created inside the mode while any tensor still refers to them."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._storages: dict[int, list[int]] = {}  # storage key -> [tensor references, bytes]

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # Views and in-place or out= results share an input's storage: when that storage predates the trace
        # (weights, a caller's tensors; a Linear's weight.t() is one) they allocate nothing.
        returns = func._schema.returns
        aliasing = bool(returns) and all(result.alias_info is not None for result in returns)
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            entry = self._storages.get(key)
            if entry is None and aliasing:
                continue
            if entry is None:
                self._storages[key] = [1, storage.nbytes()]
                self.largest = max(self.largest, storage.nbytes())
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            else:
                entry[0] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def _fused_attention_stand_in(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """What a fused SDPA kernel allocates: the output and its per-row log-sum-exp, never the N x N scores.

    On ``meta`` SDPA takes the math path, which would count a score matrix that the flash / memory-efficient
    kernels of real CPUs and GPUs never hold.
    """
    query.new_empty(query.shape[:-1], dtype=torch.float32)
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def traced_peak(run: Callable[[], Any]) -> int:
    """Peak bytes of tensors alive at once while ``run`` executes (call it with meta tensors)."""
    import torch.nn.functional as F

    mode = _LiveBytes()
    real_attention = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention_stand_in
    try:
        with torch.no_grad(), mode:
            run()
    finally:
        F.scaled_dot_product_attention = real_attention
    return mode.peak


def parse_size(text: str | int | float) -> int:
    """'24GB', '24G', '1.5GiB', '512MB', '512MiB' or a number of bytes -> bytes (GB and GiB both 2**30)."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match:
        raise ValueError(f"cannot read memory size {text!r}; write it like 24GB, 1.5GiB or 512MB")
    number, unit = float(match.group(1)), match.group(2)
    return int(number * 1024 ** "_kmgt".index(unit or "_"))


def format_size(size: float) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / MIB:.0f} MiB"


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

    def names(self) -> list[str]:
        names = []
        if self.sequential_cfg:
            names.append("CFG branches one at a time")
        if self.feed_forward_chunk:
            names.append(f"feed-forward in chunks of {self.feed_forward_chunk} tokens")
        if self.skip_offload:
            names.append("skip tensors parked on the CPU")
        if self.tiled_vae:
            names.append("exact tiled VAE")
        if self.model_offload:
            names.append("model CPU offload")
        return names or ["none needed"]


@dataclass
class StagePlan:
    width: int
    height: int
    savers: Savers
    weights: int
    unet_activations: int
    vae_activations: int
    unet_weights: int = 0  # the UNet's (and ControlNet's) share of ``weights``
    vae_weights: int = 0

    @property
    def peak(self) -> int:
        if self.savers.model_offload:  # each phase holds only its own model (text encoders: their weights)
            return max(
                self.unet_weights + self.unet_activations,
                self.vae_weights + self.vae_activations,
                self.weights - self.unet_weights - self.vae_weights,
            )
        return self.weights + max(self.unet_activations, self.vae_activations)


@dataclass
class MemoryPlan:
    budget: int
    device: torch.device
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(stage.peak for stage in self.stages)

    def describe(self) -> str:
        lines = [f"memory plan for {self.device.type} (budget {format_size(self.budget)}):"]
        for index, stage in enumerate(self.stages, start=1):
            lines.append(
                f"  stage {index} {stage.width}x{stage.height}: peak ~{format_size(stage.peak)} "
                f"(weights {format_size(stage.weights)}, UNet {format_size(stage.unet_activations)}, "
                f"VAE {format_size(stage.vae_activations)}); savers: {', '.join(stage.savers.names())}"
            )
        return "\n".join(lines)


class MemoryPlanner:
    """Estimates and plans for one pipeline (with or without LinFusion mounted) on one device."""

    def __init__(self, pipe: Any, device: torch.device | str | None = None):
        from .model import _mounted_on

        self.pipe = pipe
        parameter = next(pipe.unet.parameters())
        self.device = torch.device(device) if device is not None else parameter.device
        self.dtype = parameter.dtype
        self.linfusion = _mounted_on(pipe.unet)
        self.vae_factor = pipe.vae_scale_factor
        self._meta_unet: Any = None
        self._meta_vae: Any = None
        self._traced: dict[tuple, int] = {}

    # ------------------------------------------------------------------ meta models
    def meta_unet(self) -> Any:
        if self._meta_unet is None:
            from .model import LinFusion

            with torch.device("meta"):
                unet = type(self.pipe.unet).from_config(self.pipe.unet.config).to(self.dtype)
                if self.linfusion is not None:
                    LinFusion(modules_list=self.linfusion.config.modules_list).mount(unet)
            self._meta_unet = unet.eval()
        return self._meta_unet

    def meta_vae(self) -> Any:
        """The VAE on meta, with the mid-block attention kernel the real VAE runs now (exact or linear)."""
        from .vae_attention import set_vae_attention, vae_attention_mode

        mode = vae_attention_mode(self.pipe.vae)
        if self._meta_vae is None:
            with torch.device("meta"):
                self._meta_vae = type(self.pipe.vae).from_config(self.pipe.vae.config).to(self.dtype).eval()
        set_vae_attention(self._meta_vae, "linear" if mode == "linear" else "exact")
        return self._meta_vae

    def weights(
        self, names: Sequence[str] = ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet")
    ) -> int:
        """Bytes of the parameters and buffers of the pipeline's models named in ``names``."""
        total = 0
        for name in names:
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                total += sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        return total

    # ------------------------------------------------------------------ traced phases
    def _unet_inputs(self, height: int, width: int, batch: int) -> tuple[Any, ...]:
        config = self.pipe.unet.config
        latents = torch.empty(batch, config.in_channels, height // self.vae_factor, width // self.vae_factor,
                              device="meta", dtype=self.dtype)  # fmt: skip
        tokens = getattr(self.pipe.tokenizer, "model_max_length", 77)
        context = torch.empty(batch, tokens, config.cross_attention_dim, device="meta", dtype=self.dtype)
        extra: dict[str, Any] = {}
        if config.get("addition_embed_type") == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.empty(batch, pooled, device="meta", dtype=self.dtype),
                "time_ids": torch.empty(batch, 6, device="meta", dtype=self.dtype),
            }
        return latents, context, extra

    def unet_activations(self, width: int, height: int, savers: Savers, guidance: bool = True) -> int:
        key = ("unet", width, height, replace(savers, tiled_vae=False, model_offload=False), guidance)
        if key not in self._traced:
            self._traced[key] = self._trace_unet(width, height, savers, guidance)
        return self._traced[key]

    def _trace_unet(self, width: int, height: int, savers: Savers, guidance: bool) -> int:
        from .memory import memory_savers

        unet = self.meta_unet()
        latents, context, extra = self._unet_inputs(height, width, 2 if guidance else 1)
        timestep = torch.tensor(999, device="meta")
        options = {
            "feed_forward_chunk": savers.feed_forward_chunk,
            "sequential_cfg": savers.sequential_cfg,
            "skip_offload": "meta" if savers.skip_offload else None,
        }
        # With skip_offload the parked skips stay on meta in the trace: an upper bound for the device.
        with memory_savers(unet, **options):
            live = traced_peak(lambda: unet(latents, timestep, encoder_hidden_states=context, **extra))
        return self._with_overhead(live + 3 * latents.numel() * latents.element_size())

    def vae_activations(self, width: int, height: int, savers: Savers, encode: bool = False) -> int:
        from .vae_attention import vae_attention_mode

        key = ("vae", width, height, savers.tiled_vae, encode, vae_attention_mode(self.pipe.vae))
        if key not in self._traced:
            self._traced[key] = self._trace_vae(width, height, savers, encode)
        return self._traced[key]

    def _trace_vae(self, width: int, height: int, savers: Savers, encode: bool) -> int:
        from .tiled_vae import ExactTiler

        vae = self.meta_vae()
        latents = torch.empty(1, vae.config.latent_channels, height // self.vae_factor, width // self.vae_factor,
                              device="meta", dtype=self.dtype)  # fmt: skip
        image = torch.empty(1, 3, height, width, device="meta", dtype=self.dtype)
        if savers.tiled_vae:
            tiler = ExactTiler(vae, band_bytes=DEFAULT_BAND_BYTES)
            decode, encode_run = (lambda: tiler.decode(latents)), (lambda: tiler.encode_moments(image))
        else:
            decode = lambda: vae.decode(latents)  # noqa: E731
            encode_run = lambda: vae.encode(image)  # noqa: E731
        live = traced_peak(decode)
        if encode:
            live = max(live, traced_peak(encode_run))
        # the pipeline also holds the decoded image as float and as uint8 (postprocessing)
        return self._with_overhead(live + image.numel() * 4)

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

    def plan_stage(
        self, width: int, height: int, budget: int, guidance: bool = True, encode: bool = False
    ) -> StagePlan:
        """The cheapest savers that fit ``budget`` for one stage, the UNet and VAE phases chosen apart.

        Model CPU offload (CUDA only) is the last resort: it keeps only the model at work on the device,
        at the price of moving weights every call. When nothing fits, the choice with the smallest peak is
        kept, so the plan's peak is the smallest workable budget.
        """
        weights = self.weights()
        unet_weights = self.weights(("unet", "controlnet"))
        vae_weights = self.weights(("vae",))

        def first_fitting(options: list[tuple[Savers, int]], resident: int) -> tuple[Savers, int]:
            for savers, activations in options:
                if resident + activations <= budget:
                    return savers, activations
            return min(options, key=lambda option: option[1])

        best: StagePlan | None = None
        for offload in (False, True) if self.device.type == "cuda" else (False,):
            unet_resident = unet_weights if offload else weights
            vae_resident = vae_weights if offload else weights
            unet_options = []
            for savers in self._unet_ladder():
                unet_options.append((savers, self.unet_activations(width, height, savers, guidance)))
                if unet_resident + unet_options[-1][1] <= budget:
                    break
            vae_options = [(Savers(), self.vae_activations(width, height, Savers(), encode))]
            if vae_resident + vae_options[0][1] > budget:
                tiled = Savers(tiled_vae=True)
                vae_options.append((tiled, self.vae_activations(width, height, tiled, encode)))
            unet_savers, unet_bytes = first_fitting(unet_options, unet_resident)
            vae_savers, vae_bytes = first_fitting(vae_options, vae_resident)
            savers = replace(unet_savers, tiled_vae=vae_savers.tiled_vae, model_offload=offload)
            stage = StagePlan(
                width, height, savers, weights, unet_bytes, vae_bytes, unet_weights, vae_weights
            )
            if stage.peak <= budget:
                return stage
            if best is None or stage.peak < best.peak:
                best = stage
        assert best is not None
        return best

    def plan(
        self,
        sizes: Sequence[tuple[int, int]],
        budget: int | str | None = None,
        guidance: bool = True,
        encodes: Sequence[bool] | None = None,
    ) -> MemoryPlan:
        """Plan every stage; raise :class:`MemoryBudgetError` before anything runs if one cannot fit.

        Without ``budget``: the device's free memory plus the weights already loaded on it.
        """
        budget = available_memory(self.device) + self.weights() if budget is None else parse_size(budget)
        encodes = list(encodes) if encodes is not None else [False] * len(sizes)
        plan = MemoryPlan(budget, self.device)
        for (width, height), encode in zip(sizes, encodes):
            plan.stages.append(self.plan_stage(width, height, budget, guidance, encode))
        if plan.peak > budget:
            raise MemoryBudgetError(
                f"estimated peak {format_size(plan.peak)} exceeds the budget of {format_size(budget)} even with "
                f"every saver on; the smallest workable budget is about {format_size(plan.peak)} "
                f"(pass --max-memory {_flag_value(plan.peak)} or a smaller size)\n" + plan.describe()
            )
        return plan


def _flag_value(size: int) -> str:
    """A --max-memory value at least ``size``: whole MB below 1 GiB, tenths of GB above."""
    if size < GIB:
        return f"{-(-size // MIB)}MB"
    return f"{-(-size * 10 // GIB) / 10:g}GB"
