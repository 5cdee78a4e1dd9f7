"""Measuring a pipeline for the planner: activation bytes, FLOPs, host bytes of each phase, on ``meta``.

The denoiser (a UNet, or a diffusion transformer such as PixArt's; with LinFusion and the chosen savers)
and the VAE (plain or exactly tiled) are rebuilt from their configs on ``meta`` and called under a
dispatch mode that counts the bytes of live tensors (and torch's flop counter for FLOPs). The methods keep
the UNet's names (``unet_activations``, ``unet_flops``, ...) for either denoiser. Nothing is computed, and
every saver is accounted for exactly as it changes the program. Stages up to ``TRACE_LIMIT_TOKENS`` latent
tokens are traced at their own size; larger ones at a few smaller sizes of the same aspect ratio, extended
as a polynomial in pixels (:class:`Extrapolated`), so that a 16K stage is measured in seconds. The banded
UNet, the banded DiT and the tiled VAE are costed by their own analytic cost models. Device allocators add
overhead on top of live tensors; ``OVERHEAD`` holds the correction per device type (CPU: fitted on RSS
high-water marks of fresh processes, see docs/high-resolution.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..attention import GeneralizedLinearAttention
from ..io import MIB
from ..model import LinFusion, denoiser_of, mounted_on
from ..patches.banded_dit import DiTCost, UnsupportedDiT, banded_dit_cost, check_banded_dit
from ..patches.banded_unet import UNetCost, UnsupportedUNet, banded_unet_cost, check_banded_unet
from ..patches.savers import apply_memory_savers
from ..patches.stage import DEFAULT_BAND_BYTES, TEXT_ENCODERS, Savers, cpu_encode_dtype
from ..patches.vae_attention import apply_vae_attention
from ..registry import is_dit, max_sequence_length
from ..tiled_vae import ExactTiler, StoreBudgetError, UnsupportedVAE, tiled_vae_cost
from ..tracing import traced_flops, traced_peak
from ..vae_attention import vae_attention_mode

# real peak ~= scale * traced live bytes + constant. CPU: fitted on RSS high-water marks (2 cores, torch
# 2.13, oneDNN convolutions). CUDA: not measured yet; the allocator's max_memory_allocated counts live
# tensors plus library workspaces, so a 10 % + 512 MiB margin is used until a GPU run calibrates it.
OVERHEAD = {"cpu": (1.1, 64 * MIB), "cuda": (1.1, 512 * MIB)}


def available_memory(device: torch.device) -> int:
    """Free memory of ``device``: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read available memory from /proc/meminfo; pass --max-memory")


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
DENOISERS = ("unet", "controlnet", "transformer")  # the models of the denoising phase


class Measurements:
    """What one pipeline (with or without LinFusion mounted) costs on one device, phase by phase.

    ``pipe`` may be a loaded pipeline or a structure built on ``meta`` (``app.loading.load_structure``):
    only the models' configs and parameter sizes are read, so a plan needs neither the device nor weights.
    """

    def __init__(
        self,
        pipe: Any,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        stripes: int = 1,
    ):
        self.pipe = pipe
        self.stripes = stripes  # > 1: one rank of a spatial-parallel run, where no banded engine can run
        self.denoiser = denoiser_of(pipe)  # the UNet, or a diffusion transformer
        self.dit = is_dit(self.denoiser)
        parameter = next(self.denoiser.parameters())
        self.device = torch.device(device) if device is not None else parameter.device
        self.dtype = dtype or parameter.dtype
        self.linfusion = mounted_on(self.denoiser)
        self.vae_factor = pipe.vae_scale_factor
        self._meta_unet: Any = None
        self._meta_vaes: dict[str, Any] = {}
        self._meta_attention: dict[str, Any] = {}
        self._measures: dict[tuple, Extrapolated] = {}
        self._banded: dict[tuple, UNetCost | DiTCost] = {}
        self._banded_ok: bool | None = None
        self._tiled: dict[tuple, tuple[int, int, int, int] | None] = {}

    # ------------------------------------------------------------------ meta models
    def meta_unet(self) -> Any:
        """The denoiser (UNet or transformer) on meta, with the LinFusion layers the real one runs."""
        if self._meta_unet is None:
            with torch.device("meta"):
                unet = type(self.denoiser).from_config(self.denoiser.config).to(self.dtype)
                if self.linfusion is not None:
                    LinFusion(modules_list=self.linfusion.config.modules_list).mount(unet)
            self._meta_unet = unet.eval()
        return self._meta_unet

    def meta_vae(self) -> Any:
        """The VAE on meta, with the mid-block attention kernel the real VAE runs now (exact or linear)."""
        mode = self.vae_mode()
        if mode not in self._meta_vaes:
            with torch.device("meta"):
                vae = type(self.pipe.vae).from_config(self.pipe.vae.config).to(self.dtype).eval()
            if mode == "linear":
                apply_vae_attention(vae, "linear")  # the meta copy is the planner's own: never removed
            self._meta_vaes[mode] = vae
        return self._meta_vaes[mode]

    def vae_mode(self) -> str:
        return "linear" if vae_attention_mode(self.pipe.vae) == "linear" else "exact"

    def weights(
        self,
        names: Sequence[str] = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "controlnet"),
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
    @property
    def context_tokens(self) -> int:
        """Text tokens the denoiser's cross-attention reads: the tokenizer's length (CLIP's 77 without one);
        for a DiT the pipeline's ``max_sequence_length`` (PixArt-Alpha 120, PixArt-Sigma 300)."""
        if self.dit:
            return max_sequence_length(self.pipe)
        return getattr(getattr(self.pipe, "tokenizer", None), "model_max_length", None) or 77

    def unet_inputs(self, height: int, width: int, batch: int) -> tuple[Any, ...]:
        config = self.denoiser.config
        latents = torch.empty(batch, config.in_channels, height // self.vae_factor, width // self.vae_factor,
                              device="meta", dtype=self.dtype)  # fmt: skip
        if self.dit:
            from ..patches.banded_dit.cost import meta_dit_inputs

            inputs = meta_dit_inputs(
                self.meta_unet(), batch, *latents.shape[2:], self.dtype, self.context_tokens
            )
            del inputs["hidden_states"]
            return latents, inputs.pop("encoder_hidden_states"), inputs
        context = torch.empty(
            batch, self.context_tokens, config.cross_attention_dim, device="meta", dtype=self.dtype
        )
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
        """Sizes the denoiser accepts: the latent must halve evenly at every downsampling (UNet) or divide
        into patches (DiT)."""
        if self.dit:
            return self.vae_factor * self.denoiser.config.patch_size
        levels = len(self.denoiser.config.block_out_channels) - 1
        return self.vae_factor * 2**levels

    def _extrapolated(
        self, key: tuple, measure: Callable[[int, int], int], degree: int, limit: int = TRACE_LIMIT_TOKENS
    ) -> Extrapolated:
        """``limit`` in latent pixels; a DiT's tokens are patches of them, so its limit (as many tokens as
        a UNet's latent pixels: feed-forward chunking in its linear regime) grows by the patch area."""
        if self.dit:
            limit *= self.denoiser.config.patch_size**2
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
        return self.with_overhead(measure(width, height, self._tokens_per_pixel))

    def _run_unet(self, width: int, height: int, batch: int, unet: Any = None) -> Callable[[], Any]:
        unet = self.meta_unet() if unet is None else unet
        latents, context, extra = self.unet_inputs(height, width, batch)
        if self.dit:  # the latent positionally, as the pipelines pass it (sequential CFG splits it)
            return lambda: unet(latents, encoder_hidden_states=context, **extra)
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
        """FLOPs of one UNet call (both guidance branches when ``guidance``); a DiT's as :meth:`call_flops`
        counts them, LinFusion's attention products included."""
        if self.dit:
            return self.call_flops(
                width, height, "softmax" if self.linfusion is None else "linfusion", guidance
            )
        key = ("unet flops", guidance)
        measure = self._extrapolated(
            key, lambda w, h: traced_flops(self._run_unet(w, h, 2 if guidance else 1)), 2
        )
        return measure(width, height, self._tokens_per_pixel)

    def meta_denoiser(self, attention: str) -> Any:
        """A meta copy of the denoiser with ``attention`` "softmax" (its original self-attention) or
        "linfusion" (the layers mounted on it, else LinFusion's default ones)."""
        if attention == "linfusion" and self.linfusion is not None:
            return self.meta_unet()
        if attention not in self._meta_attention:
            with torch.device("meta"):
                model = type(self.denoiser).from_config(self.denoiser.config).to(self.dtype).eval()
                if attention == "linfusion":
                    LinFusion.from_unet(model).mount(model)
            self._meta_attention[attention] = model
        return self._meta_attention[attention]

    def call_flops(self, width: int, height: int, attention: str, guidance: bool = True) -> int:
        """FLOPs of one denoiser call (both guidance branches when ``guidance``) with ``attention``
        "softmax" or "linfusion" (see :meth:`meta_denoiser`).

        LinFusion's attention products are counted from each layer's input shape (its kernels skip the
        work on ``meta``, hiding it from torch's counter): ``phi(K)^T V`` and every query's read.
        """
        from ..patches.banded_unet.attention import LinearAttentionPasses

        def measure(w: int, h: int) -> int:
            model = self.meta_denoiser(attention)
            layers: list[tuple[Any, int, int]] = []

            def record(layer: Any, args: Any) -> None:
                shape = args[0].shape  # (B, N, C) or (B, C, H, W)
                tokens = shape[1] if len(shape) == 3 else shape[2] * shape[3]
                layers.append((layer, shape[0], tokens))

            hooks = [m.register_forward_pre_hook(record) for m in model.modules()
                     if isinstance(m, GeneralizedLinearAttention)]  # fmt: skip
            try:
                flops = traced_flops(self._run_unet(w, h, 2 if guidance else 1, model))
            finally:
                for hook in hooks:
                    hook.remove()
            return flops + sum(LinearAttentionPasses.core_flops(*layer) for layer in layers)

        key = ("call flops", attention, guidance)
        return self._extrapolated(key, measure, 2, FLOPS_LIMIT_TOKENS)(width, height, self._tokens_per_pixel)

    def vae_activations(self, width: int, height: int, savers: Savers, encode: bool = False) -> int:
        """Device bytes of the VAE decode (and encode, when ``encode``) activations with ``savers``."""
        key = ("vae", savers.tiled_vae, encode, self.vae_mode())
        measure = self._extrapolated(key, lambda w, h: self._trace_vae(w, h, savers, encode), 1)
        return self.with_overhead(measure(width, height, self._tokens_per_pixel))

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
        key = ("vae flops", encode, self.vae_mode())

        def measure(w: int, h: int) -> int:
            decode, encode_run = self._vae_runs(w, h, tiled=False)
            return traced_flops(decode) + (traced_flops(encode_run) if encode else 0)

        return self._extrapolated(key, measure, 2, FLOPS_LIMIT_TOKENS)(width, height, self._tokens_per_pixel)

    def text_encoder_flops(self, guidance: bool = True) -> int:
        """FLOPs of encoding the prompt once (and the negative prompt under guidance): two per weight of the
        text encoders' linear layers per caption token. Attention scores over a caption (at most 300 tokens)
        add about 1 % on T5-XXL and are left out."""
        prompts = 2 if guidance else 1
        total = 0
        for name in TEXT_ENCODERS:
            encoder = getattr(self.pipe, name, None)
            if isinstance(encoder, torch.nn.Module):
                linears = [m for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
                total += sum(linear.weight.numel() for linear in linears)
        return 2 * total * self.context_tokens * prompts

    def cpu_encode_extra_bytes(self) -> int:
        """Host bytes the text encoders take beyond their weights while they encode on the CPU: held in
        :func:`~linfusion.patches.stage.cpu_encode_dtype` (float32 for float16: twice their bytes), else 0."""
        itemsize = torch.empty((), dtype=cpu_encode_dtype(self.dtype)).element_size()
        text = self.weights(TEXT_ENCODERS)
        return text * itemsize // self._itemsize - text

    def with_overhead(self, live: int) -> int:
        scale, constant = OVERHEAD.get(self.device.type, OVERHEAD["cuda"])
        return int(scale * live + constant)

    # ------------------------------------------------------------------ cost models
    def bandable(self) -> bool:
        """Whether the banded UNet (or, for a DiT, the banded DiT: LinFusion mounted) can run the denoiser
        (never on one rank of a spatial-parallel run: the bands would take its stripe for the whole image)."""
        if self.stripes > 1:
            return False
        if self._banded_ok is None:
            try:
                (check_banded_dit if self.dit else check_banded_unet)(self.meta_unet())
                self._banded_ok = True
            except (UnsupportedUNet, UnsupportedDiT):
                self._banded_ok = False
        return self._banded_ok

    def banded_cost(
        self, width: int, height: int, guidance: bool, sequential: bool, device_store_bytes: int | None
    ) -> UNetCost | DiTCost:
        """One banded UNet (or DiT) call's cost (cached): both guidance branches, or one when ``sequential``."""
        key = (width, height, guidance, sequential, device_store_bytes)
        if key in self._banded:
            return self._banded[key]
        common = {
            "dtype": self.dtype,
            "batch": 2 if guidance and not sequential else 1,
            "band_bytes": DEFAULT_BAND_BYTES,
            "store_on_host": device_store_bytes is not None,
            "device_store_bytes": device_store_bytes,
            "vae_scale_factor": self.vae_factor,
        }
        if self.dit:
            cost = banded_dit_cost(
                self.meta_unet(), width, height, caption_tokens=self.context_tokens, **common
            )
        else:
            cost = banded_unet_cost(self.meta_unet(), width, height, linfusion=self.linfusion is not None,
                                    context_tokens=self.context_tokens, **common)  # fmt: skip
        self._banded[key] = cost
        return self._banded[key]

    def tiled_vae_cost(
        self, width: int, height: int, encode: bool, store_limit_bytes: int | None, on_device: int | None
    ) -> tuple[int, int, int, int] | None:
        """(device bytes, host bytes, FLOPs, bytes moved to and from the host) of the tiled decode (and
        encode), or None when the store cannot be that small."""
        key = (width, height, encode, store_limit_bytes, on_device, self.vae_mode())
        if key not in self._tiled:
            common = {"dtype": self.dtype, "band_bytes": DEFAULT_BAND_BYTES, "store_limit_bytes": store_limit_bytes,
                      "device_store_bytes": on_device, "attention": self.vae_mode()}  # fmt: skip
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
                    sum(c.moved_bytes for c in costs),
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
                store_limit_bytes=0, encode=encode, attention=self.vae_mode(),
            )  # fmt: skip
            store = 0
        except StoreBudgetError as error:
            store = error.minimum
        except UnsupportedVAE:
            store = 0
        return self.weights() + store + image


__all__ = [
    "DENOISERS",
    "FLOPS_LIMIT_TOKENS",
    "OVERHEAD",
    "TRACE_LIMIT_TOKENS",
    "Extrapolated",
    "Measurements",
    "available_memory",
]
