"""Bounded-memory, exact UNet forward: the UNet runs layer by layer over row bands of the latent.

A plain UNet call holds whole activations on the device: at 16384x8192 px (a 2048x1024 latent, 2M tokens)
one SD-1.5 activation of the first level is 1.3 GB in fp16 for each CFG branch, and the skip tensors the up
blocks concatenate add a dozen of them. Here every layer runs over row bands instead, as the exact tiled
VAE does, and only bands are on the device:

- every convolution reads its band plus the halo rows it needs (zero rows at the image border), so it
  computes exactly what the whole convolution computes; stride-2 downsamplers read rows ``2a - 1 ..``,
  nearest-x2 upsamplers map each output row to its source row with the interpolation's own rule;
- every stored activation carries per-(sample, channel) count, mean and M2, merged band by band in float64
  (Chan's formula, as the spatial-parallel GroupNorm does), so each GroupNorm normalizes with whole-image
  statistics;
- a ``Transformer2DModel`` runs as one pass per transformer block plus one: the first pass applies its
  GroupNorm and ``proj_in`` and sums the first LinFusion ``attn1``'s key/value state over the bands; pass
  ``i`` reads that state with each band's queries, runs the per-token rest of block ``i`` (LayerNorms,
  cross-attention to the text, feed-forward) and sums block ``i + 1``'s state from the new tokens; the last
  pass ends with ``proj_out`` and the residual. Nothing is computed twice. A diffusers softmax ``attn1``
  (a UNet without LinFusion) keeps the keys and values of all tokens on the device and lets each band's
  queries attend to them: exact, but quadratic in time and linear in device memory (for tests and small
  sizes);
- full activations (the residual stream, the skip tensors the up blocks concatenate, a transformer's
  token stream) live in a *store*: on the UNet's device by default, or on another device
  (``store_device="cpu"``), where they are kept row-major ``(rows, batch, channels, width)`` so that a
  band is one contiguous block: one copy each way. On the CPU that store is one :class:`HostArena` kept
  across calls (pinned once when the UNet is on a GPU). ``device_store_bytes`` keeps up to that many bytes of
  the working stream on the UNet's device; skip tensors, which wait longest, always go to the store.
  With a separate store each band's input is fetched one band ahead; on CUDA the copies run on a side
  stream and overlap the compute.

The result equals the plain UNet up to float summation order (tested within 1e-4 in fp32). Batches of any
size run in one pass per layer, so the two classifier-free-guidance branches share every band pass; with
:func:`linfusion.patches.savers.apply_sequential_cfg` applied after this patch they run one after the other,
halving store and band memory.

:func:`banded_unet_cost` predicts device and host bytes, FLOPs and host traffic without computing anything:
it walks the same schedule on the ``meta`` device with the same store, traces the working memory of one
band of every pass and counts FLOPs analytically, in well under a second at 16K.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import GeneralizedLinearAttention
from ..ops import linear_attention_from_state, linear_attention_state
from ..tiled_vae import estimate_band_rows
from ..tracing import traced_peak
from .base import Patch, set_attribute

DEFAULT_BAND_BYTES = 256 * 2**20

# Physical layouts of stored activations, as permutations of the logical (batch, channels, rows, width).
# On the compute device: plain NCHW for conv activations, NHWC for a transformer's token stream (a band of
# rows is then a run of whole tokens). On a separate store: rows first, so a band is one contiguous block.
_CONV_ON_DEVICE = (0, 1, 2, 3)
_TOKENS_ON_DEVICE = (0, 2, 3, 1)
_CONV_PARKED = (2, 0, 1, 3)
_TOKENS_PARKED = (2, 0, 3, 1)

# Working elements per token of one transformer band, in multiples of the block width, besides the
# feed-forward's widest layer (counted twice: its output and the gated product): the residual stream,
# the normalized copy, the attention's queries and output, the next block's keys and values.
_TOKEN_WIDTHS = 6


class UnsupportedUNet(NotImplementedError):
    """The UNet (or the call) has something the banded forward cannot compute exactly; the message says what."""


# ---------------------------------------------------------------------------------------------- checks
def _require(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise UnsupportedUNet(f"the banded UNet does not support {where}: {what}")


def _check_conv(conv: Any, where: str, stride: int = 1) -> None:
    _require(type(conv) is nn.Conv2d, where, f"a {type(conv).__name__} (plain Conv2d only; fuse LoRA first)")
    kernel, padding = conv.kernel_size, conv.padding
    _require(
        kernel[0] == kernel[1] and kernel[0] % 2 == 1 and conv.dilation == (1, 1) and conv.groups == 1,
        where,
        f"kernel {kernel}, dilation {conv.dilation}, groups {conv.groups}",
    )
    _require(
        not isinstance(padding, str) and padding == (kernel[0] // 2,) * 2 and conv.padding_mode == "zeros",
        where,
        f"padding {padding!r} ({conv.padding_mode}); only symmetric zero padding of kernel // 2",
    )
    _require(conv.stride == (stride, stride), where, f"stride {conv.stride}")


def _check_pointwise(module: Any, where: str) -> None:
    if isinstance(module, nn.Conv2d):
        _require(
            module.kernel_size == (1, 1) and module.stride == (1, 1), where, "a projection wider than 1x1"
        )
    else:
        _require(isinstance(module, nn.Linear), where, f"a {type(module).__name__} projection")


def _check_resnet(resnet: Any, where: str) -> None:
    from diffusers.models.resnet import ResnetBlock2D

    _require(type(resnet) is ResnetBlock2D, where, f"a {type(resnet).__name__}")
    _require(resnet.upsample is None and resnet.downsample is None, where, "resampling inside the ResNet")
    _require(
        resnet.time_embedding_norm == "default", where, f"time_embedding_norm={resnet.time_embedding_norm}"
    )
    _require(isinstance(resnet.nonlinearity, nn.SiLU), where, f"activation {resnet.nonlinearity}")
    _require(
        isinstance(resnet.norm1, nn.GroupNorm) and isinstance(resnet.norm2, nn.GroupNorm),
        where,
        "non-GroupNorm",
    )
    _check_conv(resnet.conv1, f"{where}.conv1")
    _check_conv(resnet.conv2, f"{where}.conv2")
    if resnet.conv_shortcut is not None:
        _require(
            isinstance(resnet.conv_shortcut, nn.Conv2d) and resnet.conv_shortcut.kernel_size == (1, 1),
            where,
            "a shortcut wider than 1x1",
        )


def _check_self_attention(attention: Any, where: str) -> None:
    if isinstance(attention, GeneralizedLinearAttention):
        return
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    _require(isinstance(attention, Attention), where, f"a {type(attention).__name__} self-attention")
    _require(
        type(attention.processor) is AttnProcessor2_0,
        where,
        f"the {type(attention.processor).__name__} processor (the exact softmax path reproduces AttnProcessor2_0)",
    )
    _require(
        attention.group_norm is None
        and attention.spatial_norm is None
        and attention.norm_q is None
        and attention.norm_k is None
        and not attention.residual_connection
        and not getattr(attention, "fused_projections", False),
        where,
        "self-attention with norms, a residual or fused projections",
    )


def _check_transformer(transformer: Any, where: str) -> None:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    _require(type(transformer) is Transformer2DModel, where, f"a {type(transformer).__name__}")
    _require(transformer.is_input_continuous, where, "non-continuous (vectorized or patched) inputs")
    _require(isinstance(transformer.norm, nn.GroupNorm), where, "a non-GroupNorm input norm")
    _check_pointwise(transformer.proj_in, f"{where}.proj_in")
    _check_pointwise(transformer.proj_out, f"{where}.proj_out")
    for index, block in enumerate(transformer.transformer_blocks):
        name = f"{where}.transformer_blocks.{index}"
        _require(type(block) is BasicTransformerBlock, name, f"a {type(block).__name__}")
        _require(block.norm_type == "layer_norm", name, f"norm_type={block.norm_type}")
        _require(
            block.pos_embed is None and not block.only_cross_attention, name, "positional or cross-only attn1"
        )
        _check_self_attention(block.attn1, f"{name}.attn1")
        if block.attn2 is not None:
            _require(
                block.attn2.is_cross_attention
                and block.attn2.group_norm is None
                and block.attn2.spatial_norm is None,
                f"{name}.attn2",
                "a second self-attention (double_self_attention) or a spatial norm",
            )


def check_banded_unet(unet: nn.Module) -> None:
    """Raise :class:`UnsupportedUNet` unless every layer of ``unet`` has an exact banded form."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    _require(isinstance(unet, UNet2DConditionModel), "this model", f"a {type(unet).__name__}")
    _require(unet.config.addition_embed_type != "image_hint", "the UNet", "image-hint inputs")
    _check_conv(unet.conv_in, "conv_in")
    _check_conv(unet.conv_out, "conv_out")
    if unet.conv_norm_out is not None:
        _require(isinstance(unet.conv_norm_out, nn.GroupNorm), "conv_norm_out", "a non-GroupNorm output norm")
        _require(isinstance(unet.conv_act, nn.SiLU), "conv_act", f"activation {unet.conv_act}")
    kinds = {
        "down_blocks": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_blocks": ("UpBlock2D", "CrossAttnUpBlock2D"),
    }
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    if unet.mid_block is not None:
        _require(
            type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn",
            "mid_block",
            type(unet.mid_block).__name__,
        )
        blocks.append(("mid_block", unet.mid_block))
    for where, block in blocks:
        if where != "mid_block":
            _require(type(block).__name__ in kinds[where.split(".")[0]], where, type(block).__name__)
        for index, resnet in enumerate(block.resnets):
            _check_resnet(resnet, f"{where}.resnets.{index}")
        for index, transformer in enumerate(getattr(block, "attentions", None) or []):
            _check_transformer(transformer, f"{where}.attentions.{index}")
        for downsampler in getattr(block, "downsamplers", None) or []:
            _require(
                type(downsampler) is Downsample2D and downsampler.use_conv and downsampler.norm is None,
                where,
                "a pooling or normalized downsampler",
            )
            _require(downsampler.padding == 1, where, "downsample_padding 0 (an extra bottom row)")
            _check_conv(downsampler.conv, f"{where}.downsamplers.0.conv", stride=2)
        for upsampler in getattr(block, "upsamplers", None) or []:
            _require(
                type(upsampler) is Upsample2D
                and upsampler.use_conv
                and upsampler.interpolate
                and not upsampler.use_conv_transpose
                and upsampler.norm is None
                and upsampler.name == "conv",
                where,
                "an upsampler other than nearest x2 + conv",
            )
            _check_conv(upsampler.conv, f"{where}.upsamplers.0.conv")
    dropping = [m for m in unet.modules() if isinstance(m, nn.Dropout) and m.training and m.p > 0]
    _require(not dropping, "the UNet", "active dropout (call unet.eval())")


def _check_call(unet: nn.Module, sample: torch.Tensor, options: dict[str, Any]) -> None:
    """The per-call conditions (inputs, FreeU switched on since the patch was applied)."""
    _require(options.get("attention_mask") is None, "the call", "a self-attention mask (attention_mask)")
    _require(
        options.get("down_intrablock_additional_residuals") is None,
        "the call",
        "T2I-Adapter residuals (down_intrablock_additional_residuals)",
    )
    down, mid = options.get("down_block_additional_residuals"), options.get("mid_block_additional_residual")
    _require((down is None) == (mid is None), "the call", "ControlNet residuals need both down and mid parts")
    _require("gligen" not in (options.get("cross_attention_kwargs") or {}), "the call", "GLIGEN")
    for index, block in enumerate(unet.up_blocks):
        freeu = all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2"))
        _require(
            not freeu, f"up_blocks.{index}", "FreeU (its Fourier filter is global; disable_freeu() first)"
        )
    _require(sample.ndim == 4, "the call", f"a sample of shape {tuple(sample.shape)}")


# ---------------------------------------------------------------------------------------------- storage
def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(order.index(axis) for axis in range(len(order)))


class _Moments:
    """Per-(sample, channel) count, mean and M2 of an activation, merged band by band in float64.

    Band moments come from ``var_mean`` in fp32 (centered, so no sum-of-squares cancellation) and are merged
    with Chan's formula; the GroupNorm affine is derived from them at the end.
    """

    def __init__(self, batch: int, channels: int, device: torch.device) -> None:
        self.count = 0
        self.mean = torch.zeros(batch, channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros_like(self.mean)

    def add(self, band: torch.Tensor) -> None:
        variance, mean = torch.var_mean(band.float(), dim=(2, 3), correction=0)
        count = band.shape[2] * band.shape[3]
        total = self.count + count
        delta = mean.double() - self.mean
        self.mean += delta * (count / total)
        self.m2 += variance.double() * count + delta.square() * (self.count * count / total)
        self.count = total

    @staticmethod
    def joined(parts: list[_Moments]) -> _Moments:
        """The moments of the channel concatenation of activations of equal size."""
        joined = _Moments.__new__(_Moments)
        joined.count = parts[0].count
        joined.mean = torch.cat([part.mean for part in parts], dim=1)
        joined.m2 = torch.cat([part.m2 for part in parts], dim=1)
        return joined

    def normalizer(self, norm: nn.GroupNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        """``norm`` with whole-image statistics, as a function of a band (fp32 in, fp32 out)."""
        batch, channels = self.mean.shape
        groups = norm.num_groups
        width = channels // groups
        channel_means = self.mean.view(batch, groups, width)
        group_mean = channel_means.mean(-1, keepdim=True)
        group_m2 = self.m2.view(batch, groups, width).sum(-1, keepdim=True)
        group_m2 = group_m2 + ((channel_means - group_mean).square() * self.count).sum(-1, keepdim=True)
        inverse_std = (group_m2 / (self.count * width) + norm.eps).rsqrt()
        mean = group_mean.expand(-1, -1, width).reshape(batch, channels)
        scale = inverse_std.expand(-1, -1, width).reshape(batch, channels)
        shift = torch.zeros_like(scale)
        if norm.affine:
            scale = scale * norm.weight.double()
            shift = shift + norm.bias.double()
        mean, scale, shift = (t.float()[:, :, None, None] for t in (mean, scale, shift))

        def normalize(band: torch.Tensor) -> torch.Tensor:
            return band.to(torch.float32, copy=True).sub_(mean).mul_(scale).add_(shift)

        return normalize


@dataclass(eq=False)
class _Stored:
    """A whole activation (logical shape (B, C, H, W)) in the store, in a physical ``order``."""

    tensor: torch.Tensor
    order: tuple[int, ...]
    parked: bool  # in the separate store (host), not on the compute device
    moments: _Moments | None = None
    slot: tuple[int, int] | None = None  # its place in the host arena

    @property
    def shape(self) -> tuple[int, int, int, int]:
        physical = self.tensor.shape
        return tuple(physical[self.order.index(axis)] for axis in range(4))  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def physical_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor.narrow(self.order.index(2), start, stop - start)

    def logical(self, physical: torch.Tensor) -> torch.Tensor:
        return physical.permute(_inverse(self.order))


class HostArena:
    """One host buffer that a separate store sub-allocates (first fit, 4 KiB aligned), kept across calls.

    PyTorch's pinned allocator rounds every block up to a power of two and caches freed blocks per size: on
    the UNet's allocation sequence at 16384x16384 that held 2.5x the store's peak (88 GiB for a 35 GiB
    store). One buffer, pinned once (``cudaHostRegister``) when the UNet is on a GPU, holds the peak
    itself: first fit leaves no gap on that sequence. A call that needs more than the buffer holds serves
    the overflow with ordinary tensors (copied synchronously on a GPU) and grows the buffer for the next
    call, so from the second denoising step on every parked band moves by DMA.
    """

    ALIGN = 4096

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.buffer: torch.Tensor | None = None
        self._unpin: Any = None  # unregisters the buffer, also when it is garbage-collected
        self.begin()

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    def begin(self) -> None:
        """Start a call: nothing is allocated in the buffer (the previous call released everything)."""
        self.free: list[tuple[int, int]] = []  # (offset, size) of the gaps below ``top``, by offset
        self.top = 0
        self.high = 0

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, tuple[int, int]]:
        """A tensor of ``shape`` in the buffer (or an ordinary one past its end) and its slot for :meth:`release`."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        size = -(-nbytes // self.ALIGN) * self.ALIGN
        index = next((i for i, (_, gap) in enumerate(self.free) if gap >= size), None)
        if index is not None:
            offset, gap = self.free.pop(index)
            if gap > size:
                self.free.insert(index, (offset + size, gap - size))
        else:
            offset = self.top
            self.top += size
            self.high = max(self.high, self.top)
        if self.buffer is not None and offset + size <= self.capacity:
            tensor = self.buffer[offset : offset + nbytes].view(dtype).view(shape)
        else:
            tensor = torch.empty(shape, dtype=dtype)
        return tensor, (offset, size)

    def release(self, slot: tuple[int, int]) -> None:
        self.free.append(slot)
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for offset, size in self.free:
            if merged and sum(merged[-1]) == offset:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((offset, size))
        if merged and sum(merged[-1]) == self.top:
            self.top = merged.pop()[0]
        self.free = merged

    def finish(self) -> None:
        """End a call: grow the buffer to what the call needed."""
        if self.high <= self.capacity:
            return
        self.drop()
        self.buffer = torch.empty(self.high, dtype=torch.uint8)
        if self.pin:
            pointer = self.buffer.data_ptr()
            error = int(torch.cuda.cudart().cudaHostRegister(pointer, self.high, 1))  # 1: portable
            if error:
                raise RuntimeError(f"pinning {self.high} bytes of host memory failed with CUDA error {error}")
            self._unpin = weakref.finalize(self.buffer, _unpin_host, pointer)

    def drop(self) -> None:
        """Give the buffer back (after the device's copies that may still use it)."""
        if self._unpin is not None:
            self._unpin()
            self._unpin = None
        self.buffer = None


def _unpin_host(pointer: int) -> None:
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaHostUnregister(pointer)


class BandStore:
    """Where whole activations live, and how many bytes each side holds now and at most.

    Without ``store_device`` everything stays on the compute device. With it, activations go to
    ``store_device`` (into a :class:`HostArena` when that is the CPU), except that the working
    stream stays on the compute device while its bytes fit ``device_budget``; skip tensors (``parked``)
    always go to ``store_device``. On ``meta`` (planning traces) the store's tensors stay on ``meta`` but
    are still accounted to the side they would be on.
    """

    def __init__(
        self,
        device: torch.device,
        store_device: torch.device | str | None = None,
        device_budget: int = 0,
        arena: HostArena | None = None,
    ) -> None:
        self.device = device
        self.separate = store_device is not None
        self.store_device = torch.device(store_device) if store_device is not None else device
        if device.type == "meta":
            self.store_device = device
        self.device_budget = device_budget if self.separate else None
        # host-side activations come from ``arena`` when the store is the CPU (see HostArena)
        self.arena = arena if self.separate and self.store_device.type == "cpu" else None
        self.live = {"device": 0, "host": 0}
        self.peak = {"device": 0, "host": 0}

    def _account(self, side: str, nbytes: int) -> None:
        self.live[side] += nbytes
        self.peak[side] = max(self.peak[side], self.live[side])

    def allocate(
        self, shape: tuple[int, ...], dtype: torch.dtype, *, parked: bool, tokens: bool = False
    ) -> _Stored:
        """A new whole activation of logical shape (B, C, H, W); ``tokens`` for a transformer's stream."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        on_host = self.separate and (
            parked or self.device_budget is None or self.live["device"] + nbytes > self.device_budget
        )
        if on_host:
            order = _TOKENS_PARKED if tokens else _CONV_PARKED
            device = self.store_device
        else:
            order = _TOKENS_ON_DEVICE if tokens else _CONV_ON_DEVICE
            device = self.device
        physical = tuple(shape[axis] for axis in order)
        slot = None
        if on_host and self.arena is not None:
            tensor, slot = self.arena.allocate(physical, dtype)
        else:
            tensor = torch.empty(physical, dtype=dtype, device=device)
        self._account("host" if on_host else "device", nbytes)
        return _Stored(tensor, order, on_host, slot=slot)

    def scratch(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor that lives on the compute device across bands (attention state and keys, the output)."""
        return self.hold(torch.empty(shape, dtype=dtype, device=self.device))

    def hold(self, tensor: torch.Tensor) -> torch.Tensor:
        """Account ``tensor`` (on the compute device) until it is released; returns it."""
        self._account("device", tensor.numel() * tensor.element_size())
        return tensor

    def release(self, item: _Stored | torch.Tensor) -> None:
        if isinstance(item, _Stored):
            self.live["host" if item.parked else "device"] -= item.nbytes
            item.tensor = item.tensor.new_empty(0)
            if item.slot is not None and self.arena is not None:
                self.arena.release(item.slot)
                item.slot = None
        else:
            self.live["device"] -= item.numel() * item.element_size()


class _Transfers:
    """Band copies between the store and the compute device.

    CUDA with a separate store: copies run on a side stream (from and to pinned memory) and the compute
    stream waits only for the band it needs, so the next band's fetch overlaps the current band's compute.
    Everywhere else they are plain copies; bands of activations on the compute device are views.
    """

    def __init__(self, device: torch.device, store: BandStore) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and store.separate else None
        self.fetched = 0  # bytes copied from the store device to the compute device
        self.written = 0  # bytes copied back

    def fetch(self, stored: _Stored, start: int, stop: int) -> Any:
        """Start bringing rows [start, stop) of ``stored`` to the compute device; :meth:`ready` waits."""
        rows = stored.physical_rows(start, stop)
        if not stored.parked:
            return stored.logical(rows)
        self.fetched += rows.numel() * rows.element_size()
        if self.stream is None:
            return stored.logical(rows.to(self.device, copy=True))
        with torch.cuda.stream(self.stream):
            copy = rows.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return (stored.logical(copy), done)

    def ready(self, fetched: Any) -> Any:
        """The tensors of a :meth:`fetch` (or a list of them), usable on the compute stream."""
        if isinstance(fetched, list):
            return [self.ready(item) for item in fetched]
        if isinstance(fetched, tuple):
            tensor, done = fetched
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            tensor.record_stream(compute)
            return tensor
        return fetched

    def put(self, stored: _Stored, start: int, stop: int, band: torch.Tensor) -> None:
        """Write a logical (B, C, rows, W) band into rows [start, stop) of ``stored``."""
        rows = stored.physical_rows(start, stop)
        physical = band.permute(stored.order)
        if not stored.parked:
            rows.copy_(physical)
            return
        self.written += rows.numel() * rows.element_size()
        if self.stream is None:
            rows.copy_(physical)
            return
        physical = physical.contiguous()
        computed = torch.cuda.Event()
        computed.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(computed)
        with torch.cuda.stream(self.stream):
            rows.copy_(physical, non_blocking=True)
        physical.record_stream(self.stream)

    def finish(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


def _bands(height: int, rows: int) -> list[tuple[int, int]]:
    return [(start, min(height, start + rows)) for start in range(0, height, rows)]


def _nearest_source_rows(height: int, out_height: int, by_size: bool) -> list[int]:
    """Source row of every output row of diffusers' nearest upsampling, by the interpolation itself."""
    index = torch.arange(height, dtype=torch.float32, device="cpu").view(1, 1, height, 1)
    if by_size:
        mapped = F.interpolate(index, size=(out_height, 1), mode="nearest")
    else:
        mapped = F.interpolate(index, scale_factor=2.0, mode="nearest")
    return [int(row) for row in mapped[0, 0, :, 0].tolist()]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def _linear_flops(module: nn.Module, tokens: int) -> int:
    """FLOPs of every Linear inside ``module`` applied to ``tokens`` tokens (2 per multiply-add)."""
    return sum(
        2 * tokens * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)
    )


def _conv_flops(conv: nn.Conv2d, batch: int, height: int, width: int) -> int:
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    return 2 * batch * height * width * conv.out_channels * (conv.in_channels // conv.groups) * kernel


# ---------------------------------------------------------------------------------------------- attention
class _LinearAttentionPasses:
    """LinFusion's ``attn1`` over bands: every band adds its key/value state, then every band's queries read it."""

    def __init__(self, layer: GeneralizedLinearAttention, tokens: int, batch: int, store: BandStore) -> None:
        self.layer = layer
        self.tokens = tokens
        self.store = store
        # The bands' states sum to the whole image's; summed in float64 so the band count does not matter.
        shapes = (
            (batch, layer.heads, layer.head_dim, layer.head_dim),
            (batch, layer.heads, 1, layer.head_dim),
        )
        self.state, self.key_mean = (store.scratch(shape, torch.float64).zero_() for shape in shapes)

    def add(self, normed: torch.Tensor) -> None:
        layer = self.layer
        key = _split_heads(layer.to_k(normed + layer.to_k_(normed)), layer.heads)
        value = _split_heads(layer.to_v(normed), layer.heads)
        state, key_mean = linear_attention_state(key, value, total_tokens=self.tokens)
        self.state += state
        self.key_mean += key_mean

    def finish(self) -> None:
        """The summed state in fp32, as the kernels read it."""
        summed = (self.state, self.key_mean)
        self.state, self.key_mean = (self.store.scratch(t.shape, torch.float32).copy_(t) for t in summed)
        for tensor in summed:
            self.store.release(tensor)

    def release(self) -> None:
        self.store.release(self.state)
        self.store.release(self.key_mean)

    def read(self, normed: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        query = _split_heads(layer.to_q(normed + layer.to_q_(normed)), layer.heads)
        attended = linear_attention_from_state(query, self.state, self.key_mean, layer.eps).to(normed.dtype)
        return layer.to_out[1](layer.to_out[0](_merge_heads(attended)))

    @staticmethod
    def core_flops(layer: GeneralizedLinearAttention, batch: int, tokens: int) -> int:
        """phi(K)^T V, then phi(q) against the state and the key mean."""
        head_dim = layer.head_dim
        return 2 * batch * layer.heads * tokens * head_dim * (2 * head_dim + 1)


class _SoftmaxAttentionPasses:
    """A diffusers softmax ``attn1``: keys and values of every band kept on the device, queries per band."""

    def __init__(self, attention: nn.Module, tokens: int, batch: int, store: BandStore, dtype: torch.dtype):
        self.attention = attention
        inner = attention.to_k.out_features
        self.store = store
        self.keys = store.scratch((batch, tokens, inner), dtype)
        self.values = store.scratch((batch, tokens, inner), dtype)
        self.filled = 0

    def add(self, normed: torch.Tensor) -> None:
        stop = self.filled + normed.shape[1]
        self.keys[:, self.filled : stop] = self.attention.to_k(normed)
        self.values[:, self.filled : stop] = self.attention.to_v(normed)
        self.filled = stop

    def finish(self) -> None:
        self.filled = 0

    def read(self, normed: torch.Tensor) -> torch.Tensor:
        return _attend(self.attention, normed, self.keys, self.values)

    def release(self) -> None:
        self.store.release(self.keys)
        self.store.release(self.values)

    @staticmethod
    def core_flops(attention: nn.Module, batch: int, tokens: int) -> int:
        return 4 * batch * tokens * tokens * attention.to_q.out_features


def _attend(
    attention: nn.Module, normed: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """What ``AttnProcessor2_0`` computes for queries from ``normed`` against keys and values already projected."""
    query = _split_heads(attention.to_q(normed), attention.heads)
    key, value = _split_heads(keys, attention.heads), _split_heads(values, attention.heads)
    attended = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    attended = _merge_heads(attended).to(query.dtype)
    return attention.to_out[1](attention.to_out[0](attended)) / attention.rescale_output_factor


def _projects_text_once(attention: nn.Module, cross_attention: dict[str, Any]) -> bool:
    """Whether a cross-attention's keys and values of the text can be projected once for all bands: the
    default processor without masks, norms or extra arguments (any other runs as a module call per band)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    return (
        type(attention.processor) is AttnProcessor2_0
        and not cross_attention
        and attention.norm_cross is None
        and attention.norm_q is None
        and attention.norm_k is None
        and not attention.residual_connection
    )


def _attention_passes(attention: nn.Module, tokens: int, batch: int, run: _Run) -> Any:
    if isinstance(attention, GeneralizedLinearAttention):
        return _LinearAttentionPasses(attention, tokens, batch, run.store)
    return _SoftmaxAttentionPasses(attention, tokens, batch, run.store, run.dtype)


def _transformer_rows(
    band_bytes: int, batch: int, width: int, block: nn.Module, context_tokens: int, itemsize: int
) -> int:
    """Rows per band of a transformer pass: the token buffers in the UNet's dtype, the fp32 attention scores."""
    linears = [m for m in block.ff.modules() if isinstance(m, nn.Linear)]
    inner = block.norm1.normalized_shape[0]
    widest = max([inner] + [m.out_features for m in linears])
    heads = block.attn2.heads if block.attn2 is not None else 0
    per_token = batch * (itemsize * (_TOKEN_WIDTHS * inner + 2 * widest) + 4 * 2 * heads * context_tokens)
    return max(1, band_bytes // (per_token * width))


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class _Conditioning:
    emb: torch.Tensor
    context: torch.Tensor
    cross_attention: dict[str, Any]  # keyword arguments of every attn2 call


class _Run:
    """One banded UNet call: the layer walk, the store, the band passes and their accounting.

    ``dry`` (the cost model) walks the same schedule on ``meta`` but traces only one band of every pass:
    its working bytes on top of what the store holds on the device give the device peak.
    """

    def __init__(self, unet: nn.Module, band_bytes: int, store: BandStore, dry: bool = False) -> None:
        self.unet = unet
        weight = unet.conv_in.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.band_bytes = band_bytes
        self.store = store
        self.transfers = _Transfers(self.device, store)
        self.dry = dry
        self.flops = 0
        self.plain_flops = 0
        self.passes = 0
        self.working_peak = 0  # store bytes on the device plus one band's working bytes, at the highest
        self.context_tokens = 0
        self._dry_traces: dict[Any, tuple[int, int, int]] = {}

    # ------------------------------------------------------------------ bookkeeping
    def _count(self, banded: int, plain: int | None = None) -> None:
        self.flops += banded
        self.plain_flops += banded if plain is None else plain

    def _release(self, item: _Stored, keep: list[_Stored]) -> None:
        if not any(item is kept for kept in keep):
            self.store.release(item)

    def _write(self, out: _Stored, start: int, stop: int, band: torch.Tensor) -> None:
        band = band.to(self.dtype)
        self.transfers.put(out, start, stop, band)
        if out.moments is not None:
            out.moments.add(band)

    def _new(self, shape: tuple[int, int, int, int], parked: bool, tokens: bool = False) -> _Stored:
        stored = self.store.allocate(shape, self.dtype, parked=parked, tokens=tokens)
        if not tokens:
            stored.moments = _Moments(shape[0], shape[1], self.device)
        return stored

    def _passes(
        self,
        bands: list[tuple[int, int]],
        fetch: Callable[[int, int], Any],
        body: Callable[[int, int, Any], None],
        alike: Any = None,
    ) -> None:
        """``body(start, stop, inputs)`` for every band, ``inputs`` from ``fetch(start, stop)``.

        With a separate store the next band's fetch is issued before the current band's body runs (on CUDA
        the copies then overlap the compute). Dry runs trace one full band instead, with a second fetch
        alive to stand for the one issued ahead; passes given the same ``alike`` key (a transformer's
        identical middle blocks) reuse the first one's trace.
        """
        self.passes += 1
        ahead = self.store.separate and len(bands) > 1
        if self.dry:
            if alike is None or alike not in self._dry_traces:
                trace = self._trace_band(bands, fetch, body, ahead)
                if alike is not None:
                    self._dry_traces[alike] = trace
            working, fetched, written = self._dry_traces.get(alike) or trace
            self.working_peak = max(self.working_peak, self.store.live["device"] + working)
            self.transfers.fetched += fetched * len(bands)
            self.transfers.written += written * len(bands)
            return
        if not ahead:
            for start, stop in bands:
                body(start, stop, self.transfers.ready(fetch(start, stop)))
            return
        upcoming = fetch(*bands[0])
        for index, (start, stop) in enumerate(bands):
            current = upcoming
            upcoming = fetch(*bands[index + 1]) if index + 1 < len(bands) else None
            body(start, stop, self.transfers.ready(current))

    def _trace_band(
        self,
        bands: list[tuple[int, int]],
        fetch: Callable[[int, int], Any],
        body: Callable[[int, int, Any], None],
        ahead: bool,
    ) -> tuple[int, int, int]:
        """Working bytes of one full band (an inner one: both halos), and its bytes fetched and written."""
        start, stop = max(bands, key=lambda band: (band[1] - band[0], band[0] > 0))
        fetched, written = self.transfers.fetched, self.transfers.written

        def one_band() -> None:
            inputs = self.transfers.ready(fetch(start, stop))
            issued_ahead = fetch(start, stop) if ahead else None  # noqa: F841 - alive during the body
            body(start, stop, inputs)

        working = traced_peak(one_band)
        band_fetched = (self.transfers.fetched - fetched) // (2 if ahead else 1)
        band_written = self.transfers.written - written
        self.transfers.fetched, self.transfers.written = fetched, written
        return working, band_fetched, band_written

    # ------------------------------------------------------------------ the walk
    def forward(
        self,
        sample: torch.Tensor,
        conditioning: _Conditioning,
        down_residuals: list[torch.Tensor] | None,
        mid_residual: torch.Tensor | None,
    ) -> torch.Tensor:
        unet = self.unet
        batch, _, height, width = sample.shape
        self.context_tokens = conditioning.context.shape[1]
        sizes_needed = any(dim % 2**unet.num_upsamplers for dim in (height, width))
        x = self._conv([_Stored(sample, _CONV_ON_DEVICE, parked=False)], unet.conv_in, parked=True)
        skips = [x]
        for block in unet.down_blocks:
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for resnet, transformer in zip(block.resnets, attentions):
                y = self._resnet([x], resnet, conditioning, parked=transformer is None)
                self._release(x, skips)
                x = y
                if transformer is not None:
                    y = self._transformer(x, transformer, conditioning, parked=True)
                    self._release(x, skips)
                    x = y
                skips.append(x)
            if getattr(block, "downsamplers", None):
                x = self._conv([x], block.downsamplers[0].conv, mode="down", parked=True)
                skips.append(x)

        if down_residuals is not None:
            skips = [
                self._add(skip, residual, in_place=skip is not x)
                for skip, residual in zip(skips, down_residuals)
            ]
        if unet.mid_block is not None:
            mid = unet.mid_block
            y = self._resnet([x], mid.resnets[0], conditioning)
            self._release(x, skips)
            x = y
            for transformer, resnet in zip(mid.attentions, mid.resnets[1:]):
                y = self._transformer(x, transformer, conditioning)
                self._release(x, skips)
                x = y
                y = self._resnet([x], resnet, conditioning)
                self._release(x, skips)
                x = y
        if mid_residual is not None:
            x = self._add(x, mid_residual, in_place=not any(x is skip for skip in skips))

        for index, block in enumerate(unet.up_blocks):
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for resnet, transformer in zip(block.resnets, attentions):
                skip = skips.pop()
                y = self._resnet([x, skip], resnet, conditioning)
                self._release(x, skips)
                self._release(skip, skips)
                x = y
                if transformer is not None:
                    y = self._transformer(x, transformer, conditioning)
                    self._release(x, skips)
                    x = y
            if getattr(block, "upsamplers", None):
                final = index == len(unet.up_blocks) - 1
                size = tuple(skips[-1].shape[2:]) if sizes_needed and not final else None
                y = self._conv([x], block.upsamplers[0].conv, mode="up", up_size=size)
                self._release(x, skips)
                x = y
        out = self._conv([x], unet.conv_out, norm=unet.conv_norm_out, final=True)
        self._release(x, skips)
        self.transfers.finish()
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ layers
    def _resnet(
        self, inputs: list[_Stored], resnet: nn.Module, conditioning: _Conditioning, parked: bool = False
    ) -> _Stored:
        bias = None
        if resnet.time_emb_proj is not None:
            emb = conditioning.emb if resnet.skip_time_act else resnet.nonlinearity(conditioning.emb)
            bias = resnet.time_emb_proj(emb)[:, :, None, None]
            self._count(_linear_flops(resnet.time_emb_proj, emb.shape[0]))
        hidden = self._conv(inputs, resnet.conv1, norm=resnet.norm1, bias=bias)
        out = self._conv(
            [hidden],
            resnet.conv2,
            norm=resnet.norm2,
            residual=inputs,
            shortcut=resnet.conv_shortcut,
            scale=resnet.output_scale_factor,
            parked=parked,
        )
        self.store.release(hidden)
        return out

    def _conv(
        self,
        inputs: list[_Stored],
        conv: nn.Conv2d,
        *,
        norm: nn.GroupNorm | None = None,
        mode: str = "same",
        up_size: tuple[int, int] | None = None,
        bias: torch.Tensor | None = None,
        residual: list[_Stored] | None = None,
        shortcut: nn.Module | None = None,
        scale: float = 1.0,
        parked: bool = False,
        final: bool = False,
    ) -> _Stored | torch.Tensor:
        """``conv(silu(norm(cat(inputs))))`` (``conv(cat(inputs))`` without ``norm``) band by band.

        ``bias`` (B, C, 1, 1) is added to the conv output (the ResNet's time embedding); ``residual`` makes
        it ``(shortcut(cat(residual)) + .) / scale``. ``mode``: "same" (stride 1), "down" (diffusers'
        stride-2 downsampler), "up" (nearest upsampling to ``up_size``, default twice the size, then the
        conv). ``final`` writes an NCHW tensor on the compute device instead of the store.
        """
        batch, _, height, width = inputs[0].shape
        kernel, padding, stride = conv.kernel_size[0], conv.padding[0], conv.stride[0]
        source_rows = None
        if mode == "up":
            out_height, out_width = up_size or (2 * height, 2 * width)
            source_rows = _nearest_source_rows(height, out_height, by_size=up_size is not None)
            in_height = out_height
        else:
            out_height = (height + 2 * padding - kernel) // stride + 1
            out_width = (width + 2 * padding - kernel) // stride + 1
            in_height = height
        normalize = (
            _Moments.joined([x.moments for x in inputs]).normalizer(norm) if norm is not None else None
        )
        shape = (batch, conv.out_channels, out_height, out_width)
        if final:
            out: Any = self.store.scratch(shape, self.dtype)
        else:
            out = self._new(shape, parked)
        flops = _conv_flops(conv, batch, out_height, out_width)
        if shortcut is not None:
            flops += _conv_flops(shortcut, batch, out_height, out_width)
        self._count(flops)
        rows = estimate_band_rows(self.band_bytes, batch * (conv.in_channels + conv.out_channels), out_width)

        def window(start: int, stop: int) -> tuple[int, int, int, int]:
            """Rows of the conv input the band needs ([first, last), may pass the border) and the part inside."""
            first, last = start * stride - padding, (stop - 1) * stride - padding + kernel
            return first, last, max(first, 0), min(last, in_height)

        def fetch(start: int, stop: int) -> Any:
            _, _, low, high = window(start, stop)
            if source_rows is not None:
                low, high = source_rows[low], source_rows[high - 1] + 1
            fetched = [self.transfers.fetch(x, low, high) for x in inputs]
            if residual is not None:
                fetched += [self.transfers.fetch(x, start, stop) for x in residual]
            return fetched

        def body(start: int, stop: int, fetched: list[torch.Tensor]) -> None:
            first, last, low, high = window(start, stop)
            parts, skip_parts = fetched[: len(inputs)], fetched[len(inputs) :]
            band = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            if normalize is not None:
                band = F.silu(normalize(band), inplace=True).to(self.dtype)
            if source_rows is not None:
                local = [row - source_rows[low] for row in source_rows[low:high]]
                band = band.index_select(2, torch.tensor(local, device=band.device))
                band = F.interpolate(band, size=(high - low, out_width), mode="nearest")
            if low - first or last - high:
                band = F.pad(band, (0, 0, low - first, last - high))
            result = F.conv2d(band, conv.weight, conv.bias, stride=conv.stride, padding=(0, conv.padding[1]))
            del band
            if bias is not None:
                result = result + bias
            if skip_parts:
                skip = skip_parts[0] if len(skip_parts) == 1 else torch.cat(skip_parts, dim=1)
                if shortcut is not None:
                    skip = shortcut(skip)
                result = (skip + result) / scale
            if final:
                out[:, :, start:stop] = result
            else:
                self._write(out, start, stop, result)

        self._passes(_bands(out_height, rows), fetch, body)
        return out

    def _add(self, x: _Stored, residual: torch.Tensor, in_place: bool) -> _Stored:
        """``x + residual`` (a ControlNet residual, a whole tensor on any device), band by band."""
        batch, channels, height, width = x.shape
        out = x if in_place else self._new(x.shape, parked=x.parked)
        if in_place:
            out.moments = _Moments(batch, channels, self.device)
        rows = estimate_band_rows(self.band_bytes, 2 * batch * channels, width)

        def fetch(start: int, stop: int) -> Any:
            return [self.transfers.fetch(x, start, stop)]

        def body(start: int, stop: int, fetched: list[torch.Tensor]) -> None:
            self._write(out, start, stop, fetched[0] + residual[:, :, start:stop].to(self.device))

        self._passes(_bands(height, rows), fetch, body)
        return out

    def _transformer(
        self, x: _Stored, transformer: nn.Module, conditioning: _Conditioning, parked: bool = False
    ) -> _Stored:
        """A ``Transformer2DModel`` in ``len(blocks) + 1`` passes (see the module docstring)."""
        batch, channels, height, width = x.shape
        blocks = list(transformer.transformer_blocks)
        inner = blocks[0].norm1.normalized_shape[0]
        rows = min(
            _transformer_rows(self.band_bytes, batch, width, b, self.context_tokens, self.dtype.itemsize)
            for b in blocks
        )
        job = _TransformerJob(
            transformer,
            x,
            stream=self._new((batch, inner, height, width), parked=False, tokens=True),
            out=self._new((batch, channels, height, width), parked),
            bands=_bands(height, rows),
        )
        if job.linear_projection:
            self._count(_linear_flops(transformer.proj_in, batch * job.tokens) * 2)
        else:
            self._count(_conv_flops(transformer.proj_in, batch, height, width) * 2)
        normalize = x.moments.normalizer(transformer.norm)  # type: ignore[union-attr]
        passes = _attention_passes(blocks[0].attn1, job.tokens, batch, self)

        def fetch(start: int, stop: int) -> Any:
            return [self.transfers.fetch(x, start, stop)]

        def project_in(start: int, stop: int, fetched: list[torch.Tensor]) -> None:
            band = normalize(fetched[0]).to(self.dtype)
            if job.linear_projection:
                hidden = transformer.proj_in(_as_tokens(band))
            else:
                hidden = _as_tokens(transformer.proj_in(band))
            self.transfers.put(job.stream, start, stop, job.as_rows(hidden))
            passes.add(blocks[0].norm1(hidden))

        self._passes(job.bands, fetch, project_in)
        for index, block in enumerate(blocks):
            passes.finish()
            following = blocks[index + 1] if index + 1 < len(blocks) else None
            next_passes = None
            if following is not None:
                next_passes = _attention_passes(following.attn1, job.tokens, batch, self)
            self._block_pass(job, block, passes, following, next_passes, conditioning)
            passes.release()
            passes = next_passes
        self.store.release(job.stream)
        return job.out

    def _block_pass(
        self,
        job: _TransformerJob,
        block: nn.Module,
        passes: Any,
        following: nn.Module | None,
        following_passes: Any,
        conditioning: _Conditioning,
    ) -> None:
        """One pass of a transformer block over all bands: its per-token layers, then the following block's
        key/value state (after the last block: ``proj_out`` and the residual instead)."""
        batch, channels, _, _ = job.x.shape
        tokens = batch * job.tokens
        attn1, attn2 = block.attn1, block.attn2
        core = type(passes).core_flops(attn1, batch, job.tokens)
        self._count(_linear_flops(attn1, tokens) + core + _linear_flops(block.ff, tokens))
        text_keys = text_values = None
        if attn2 is not None:
            context_tokens = batch * conditioning.context.shape[1]
            per_query = _linear_flops(attn2.to_q, tokens) + _linear_flops(attn2.to_out, tokens)
            per_query += 4 * tokens * conditioning.context.shape[1] * attn2.to_q.out_features
            context = _linear_flops(attn2.to_k, context_tokens) + _linear_flops(attn2.to_v, context_tokens)
            if _projects_text_once(attn2, conditioning.cross_attention):
                text_keys = self.store.hold(attn2.to_k(conditioning.context))
                text_values = self.store.hold(attn2.to_v(conditioning.context))
                self._count(per_query + context)
            else:  # the module is called per band and projects the text every time
                self._count(per_query + len(job.bands) * context, per_query + context)

        def fetch(start: int, stop: int) -> Any:
            fetched = [self.transfers.fetch(job.stream, start, stop)]
            if following is None:
                fetched.append(self.transfers.fetch(job.x, start, stop))
            return fetched

        def body(start: int, stop: int, fetched: list[torch.Tensor]) -> None:
            hidden = _as_tokens(fetched[0])
            hidden = passes.read(block.norm1(hidden)) + hidden
            if text_keys is not None:
                hidden = _attend(attn2, block.norm2(hidden), text_keys, text_values) + hidden
            elif attn2 is not None:
                cross = attn2(
                    block.norm2(hidden),
                    encoder_hidden_states=conditioning.context,
                    **conditioning.cross_attention,
                )
                hidden = cross + hidden
            hidden = block.ff(block.norm3(hidden)) + hidden
            if following is not None:
                self.transfers.put(job.stream, start, stop, job.as_rows(hidden))
                following_passes.add(following.norm1(hidden))
                return
            if job.linear_projection:
                result = job.as_rows(job.transformer.proj_out(hidden))
            else:
                result = job.transformer.proj_out(job.as_rows(hidden).contiguous())
            self._write(job.out, start, stop, result + fetched[1])

        # every block but the last runs the same pass (blocks of one Transformer2DModel are built alike)
        self._passes(job.bands, fetch, body, alike=(id(job), "block") if following is not None else None)
        if text_keys is not None:
            self.store.release(text_keys)
            self.store.release(text_values)


def _as_tokens(band: torch.Tensor) -> torch.Tensor:
    """Logical (B, C, rows, W) -> tokens (B, rows * W, C), row-major as diffusers flattens them."""
    return band.permute(0, 2, 3, 1).reshape(band.shape[0], -1, band.shape[1])


@dataclass
class _TransformerJob:
    """What every pass of one ``Transformer2DModel`` shares: its input, token stream, output and bands."""

    transformer: nn.Module
    x: _Stored
    stream: _Stored  # the tokens between blocks, (B, inner, H, W) logically
    out: _Stored
    bands: list[tuple[int, int]]

    @property
    def tokens(self) -> int:
        return self.x.shape[2] * self.x.shape[3]

    @property
    def linear_projection(self) -> bool:
        return isinstance(self.transformer.proj_in, nn.Linear)

    def as_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, rows * W, C) -> logical (B, C, rows, W) (a view)."""
        batch, count, channels = tokens.shape
        width = self.x.shape[3]
        return tokens.view(batch, count // width, width, channels).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------- the patch
class BandedUNet:
    """The banded forward of one UNet, what :func:`apply_banded_unet` installs as ``unet.forward``.

    Takes the arguments of ``UNet2DConditionModel.forward`` and returns what it returns.
    """

    def __init__(
        self,
        unet: nn.Module,
        band_bytes: int = DEFAULT_BAND_BYTES,
        store_device: torch.device | str | None = None,
        device_store_bytes: int | None = None,
    ) -> None:
        if band_bytes < 1:
            raise ValueError(f"band_bytes must be >= 1; got {band_bytes}")
        self.unet = unet
        self.band_bytes = band_bytes
        self.store_device = store_device
        self.device_store_bytes = device_store_bytes
        self.last_store_peak: dict[str, int] = {}
        self.host_arena: HostArena | None = None

    def _conditioning(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                      options: dict[str, Any]) -> _Conditioning:  # fmt: skip
        """Time embedding and text context exactly as ``UNet2DConditionModel.forward`` builds them."""
        unet = self.unet
        emb = unet.time_embedding(
            unet.get_time_embed(sample=sample, timestep=timestep), options.get("timestep_cond")
        )
        class_emb = unet.get_class_embed(sample=sample, class_labels=options.get("class_labels"))
        if class_emb is not None:
            emb = (
                torch.cat([emb, class_emb], dim=-1)
                if unet.config.class_embeddings_concat
                else emb + class_emb
            )
        added = options.get("added_cond_kwargs")
        aug_emb = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added
        )
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added
        )
        cross_attention = dict(options.get("cross_attention_kwargs") or {})
        mask = options.get("encoder_attention_mask")
        if mask is not None:
            cross_attention["attention_mask"] = ((1 - mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        return _Conditioning(emb, context, cross_attention)

    def _run(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
             options: dict[str, Any], dry: bool) -> tuple[torch.Tensor, _Run]:  # fmt: skip
        unet = self.unet
        _check_call(unet, sample, options)
        check_banded_unet(unet)
        device = unet.conv_in.weight.device
        arena = None
        if not dry and self.store_device is not None:
            if self.host_arena is None:
                self.host_arena = HostArena(pin=device.type == "cuda")
            arena = self.host_arena
            arena.begin()
        store = BandStore(device, self.store_device, self.device_store_bytes or 0, arena=arena)
        run = _Run(unet, self.band_bytes, store, dry=dry)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        conditioning = self._conditioning(sample, timestep, encoder_hidden_states, options)
        run._count(self._embedding_flops(sample.shape[0], conditioning.context.shape[1]))
        down = options.get("down_block_additional_residuals")
        result = run.forward(
            sample,
            conditioning,
            list(down) if down is not None else None,
            options.get("mid_block_additional_residual"),
        )
        self.last_store_peak = dict(store.peak)
        if arena is not None:
            arena.finish()
        return result, run

    def release_host_memory(self) -> None:
        """Give back the host arena kept between calls (the next call rebuilds it)."""
        if self.host_arena is not None:
            self.host_arena.drop()
            self.host_arena = None

    def _embedding_flops(self, batch: int, context_tokens: int) -> int:
        unet = self.unet
        flops = _linear_flops(unet.time_embedding, batch)
        if getattr(unet, "add_embedding", None) is not None:
            flops += _linear_flops(unet.add_embedding, batch)
        if getattr(unet, "encoder_hid_proj", None) is not None:
            flops += _linear_flops(unet.encoder_hid_proj, batch * context_tokens)
        return flops

    @torch.no_grad()
    def _traced_cost(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                     **options: Any) -> _Run:  # fmt: skip
        return self._run(sample, timestep, encoder_hidden_states, options, dry=True)[1]

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        options = {
            "class_labels": class_labels,
            "timestep_cond": timestep_cond,
            "attention_mask": attention_mask,
            "cross_attention_kwargs": cross_attention_kwargs,
            "added_cond_kwargs": added_cond_kwargs,
            "down_block_additional_residuals": down_block_additional_residuals,
            "mid_block_additional_residual": mid_block_additional_residual,
            "down_intrablock_additional_residuals": down_intrablock_additional_residuals,
            "encoder_attention_mask": encoder_attention_mask,
        }
        if torch.is_grad_enabled():
            needs_grad = sample.requires_grad or any(p.requires_grad for p in self.unet.parameters())
            _require(not needs_grad, "the call", "gradients (inference only: call it under torch.no_grad())")
        with torch.no_grad():
            sample_out, _ = self._run(sample, timestep, encoder_hidden_states, options, dry=False)
        if not return_dict:
            return (sample_out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=sample_out)


def apply_banded_unet(
    unet: nn.Module,
    *,
    band_bytes: int = DEFAULT_BAND_BYTES,
    store_device: torch.device | str | None = None,
    device_store_bytes: int | None = None,
) -> Patch:
    """Make ``unet(...)`` (and every pipeline using it) run band by band, exactly, in bounded memory.

    ``band_bytes``: working memory of one band on the UNet's device. ``store_device``: where whole
    activations live (None: the UNet's device; ``"cpu"``: a host arena, pinned for a GPU UNet, kept
    between calls until the patch is removed or :meth:`BandedUNet.release_host_memory`).
    ``device_store_bytes``: with a separate store, bytes of the working stream that may stay on the UNet's
    device. Raises :class:`UnsupportedUNet` before changing anything when a layer has no exact banded form.
    Apply it before :func:`linfusion.patches.savers.apply_sequential_cfg` (which then wraps it) and before
    accelerate's CPU offload hooks.
    """
    check_banded_unet(unet)
    _require(
        not hasattr(unet, "_hf_hook"), "the UNet", "accelerate hooks (apply this patch before CPU offload)"
    )
    banded = BandedUNet(
        unet, band_bytes=band_bytes, store_device=store_device, device_store_bytes=device_store_bytes
    )
    patch = set_attribute(unet, "forward", banded, patch_name="banded UNet")
    patch.on_remove(banded.release_host_memory)
    return patch


# ---------------------------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class UNetCost:
    """What one banded UNet call costs (activations only: the weights come on top of ``device_peak``).

    FLOPs count multiply-adds of convolutions, linear layers and attention products as two, as
    ``torch.utils.flop_counter.FlopCounterMode`` does.
    """

    device_peak: int  # bytes on the UNet's device: its share of the store plus one band's working memory
    host_peak: int  # bytes of activations parked on the store device (0 without a separate store)
    flops: int  # the banded forward
    plain_flops: int  # the plain UNet forward
    moved_bytes: int  # bytes copied between the store device and the UNet's device
    passes: int  # passes over the whole latent (each a synchronisation point)

    @property
    def flop_overhead(self) -> float:
        return self.flops / self.plain_flops


def meta_unet_inputs(
    config: Any,
    batch: int,
    latent_height: int,
    latent_width: int,
    dtype: torch.dtype,
    context_tokens: int = 77,
) -> dict[str, Any]:
    """Keyword arguments of one UNet call on ``meta`` (sample, timestep, text context, SD-XL's added conditions)."""
    options: dict[str, Any] = {
        "sample": torch.empty(
            batch, config.in_channels, latent_height, latent_width, device="meta", dtype=dtype
        ),
        "timestep": torch.tensor(999, device="meta"),
        "encoder_hidden_states": torch.empty(
            batch, context_tokens, config.cross_attention_dim, device="meta", dtype=dtype
        ),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        options["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, pooled, device="meta", dtype=dtype),
            "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype),
        }
    return options


def _linfusion_layers(unet: nn.Module) -> list[dict[str, Any]]:
    return [
        {"module_name": name, "dim_n": m.dim, "heads": m.heads, "projection_mid_dim": m.projection_mid_dim}
        for name, m in unet.named_modules()
        if isinstance(m, GeneralizedLinearAttention)
    ]


@lru_cache(maxsize=8)
def _meta_unet(config_json: str, layers_json: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel

    from ..model import LinFusion

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    layers = json.loads(layers_json)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).eval()
        if layers == "default":
            LinFusion.from_unet(unet).mount(unet)
        elif layers:
            LinFusion(modules_list=layers).mount(unet)
    # nn.Module.to: diffusers' override warns about modules kept in fp32, which a structure copy ignores
    return nn.Module.to(unet, dtype)


def banded_unet_cost(
    unet: nn.Module | dict[str, Any],
    width: int,
    height: int,
    *,
    dtype: torch.dtype = torch.float16,
    batch: int = 2,
    band_bytes: int = DEFAULT_BAND_BYTES,
    store_on_host: bool = True,
    device_store_bytes: int | None = None,
    linfusion: bool = True,
    vae_scale_factor: int = 8,
    context_tokens: int = 77,
) -> UNetCost:
    """The cost of one banded call at ``width`` x ``height`` px, without computing anything.

    ``unet``: a UNet (its structure and LinFusion layers are used, never its weights) or a UNet config
    dict. ``linfusion``: with LinFusion ``attn1`` layers (the UNet's own when it has them, else the default
    ones) or with the softmax ones. ``batch`` 2 is classifier-free guidance in one call; 1 is one branch
    (the CFG branches one after the other). ``store_on_host``: a separate store (``store_device="cpu"``)
    with ``device_store_bytes`` bytes of it allowed on the device.
    """
    config = dict(unet.config) if isinstance(unet, nn.Module) else dict(unet)
    layers: Any = []
    if linfusion:
        layers = (_linfusion_layers(unet) if isinstance(unet, nn.Module) else []) or "default"
    meta = _meta_unet(json.dumps(config, sort_keys=True, default=list), json.dumps(layers), dtype)
    inputs = meta_unet_inputs(
        meta.config, batch, height // vae_scale_factor, width // vae_scale_factor, dtype, context_tokens
    )
    banded = BandedUNet(
        meta,
        band_bytes=band_bytes,
        store_device="cpu" if store_on_host else None,
        device_store_bytes=device_store_bytes,
    )
    run = banded._traced_cost(**inputs)
    return UNetCost(
        device_peak=max(run.working_peak, run.store.peak["device"]),
        host_peak=run.store.peak["host"],
        flops=run.flops,
        plain_flops=run.plain_flops,
        moved_bytes=run.transfers.fetched + run.transfers.written,
        passes=run.passes,
    )


__all__ = [
    "DEFAULT_BAND_BYTES",
    "BandStore",
    "BandedUNet",
    "HostArena",
    "UNetCost",
    "UnsupportedUNet",
    "apply_banded_unet",
    "banded_unet_cost",
    "check_banded_unet",
    "meta_unet_inputs",
]
