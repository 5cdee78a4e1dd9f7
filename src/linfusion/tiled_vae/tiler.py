"""Execution: :class:`ExactTiler` runs a plan's passes on an ``AutoencoderKL``, exactly.

A pass streams row chunks from a stored point through the stages (:mod:`.stages`) up to its target,
storing a point on the way and measuring the target's statistics for the GroupNorm that reads it; the
last pass writes the output. The store (:class:`linfusion.banding.BandStore`, each stored point a
:class:`~linfusion.banding.RowBlocks`) and the statistics (:class:`linfusion.banding.Moments`) are the
banding foundation's. The mid-block attention pass reads its stored input twice: keys and values of all
tokens, then the queries (:mod:`.attention`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..banding import BandStore, Moments, RowBlocks, StoredActivation
from ..vae_attention import is_linear, output_projection, split_heads
from .attention import linear_reader, softmax_in_key_chunks, softmax_reader
from .chain import LINEAR, SOFTMAX, Chain, Point, Unit, attention_chunks, rows_at, vae_units
from .checks import (
    UnsupportedVAE,
    check,
    check_attention,
    check_conv,
    check_downsampler,
    check_resnet,
    check_upsampler,
)
from .plan import DEFAULT_BAND_BYTES, DEFAULT_STORE_BLOCK_BYTES, Pass, Plan, plan_vae
from .stages import ConvStage, ResidualRows, ResidualStage, Stage


class ExactTiler:
    """Runs an ``AutoencoderKL``'s encoder or decoder pass by pass (see :mod:`linfusion.tiled_vae`).

    ``band_bytes``: device working memory of a pass's chunks. ``store_limit_bytes``: bytes the store may hold
    at once (None: no limit, so nothing is recomputed); :func:`plan_vae` picks what to store and what to
    recompute within it (``store_points="level-inputs"`` restricts it to the levels' inputs).
    ``store_device``: where the store lives (default: the VAE's device); when that is another device,
    up to ``device_store_bytes`` of it still stay on the VAE's device (filled first). ``store_block_bytes``:
    the store's allocation unit. After a run, ``pass_store_peaks`` holds the bytes the store held at most
    during each pass of the plan (its own count: the input, the stored points' blocks, the output and the
    keys and values a pass moves to the store; what :func:`tiled_vae_cost` models as the store).
    """

    def __init__(
        self,
        vae: nn.Module,
        band_bytes: int = DEFAULT_BAND_BYTES,
        store_device: torch.device | str | None = None,
        store_limit_bytes: int | None = None,
        store_points: str = "any",
        device_store_bytes: int = 0,
        store_block_bytes: int = DEFAULT_STORE_BLOCK_BYTES,
    ):
        self.vae = vae
        parameter = next(vae.parameters())
        self.device = parameter.device
        self.dtype = parameter.dtype
        self.store_device = torch.device(store_device) if store_device is not None else self.device
        self.band_bytes = band_bytes
        self.store_limit_bytes = store_limit_bytes
        self.store_points = store_points
        self.device_store_bytes = device_store_bytes if self.store_device != self.device else 0
        self.store_block_bytes = store_block_bytes

    # ------------------------------------------------------------------ public
    def plan(self, shape: Sequence[int], encode: bool = False) -> Plan:
        """The plan for an input of ``shape`` (B, C, H, W): latents to decode or images to encode."""
        batch, _, height, width = shape
        element_size = torch.empty((), dtype=self.dtype).element_size()
        units = vae_units(self.vae.config, encode)
        # the attention the VAE runs; with the chunk budget it picks the attention pass's kernel (attention_chunks)
        mode = "exact"
        attentions = [unit for unit in units if unit.kind == "attention"]
        if attentions and is_linear(self.vae.get_submodule(attentions[0].path)):
            mode = "linear"
        chain = Chain(units, batch, height, width, element_size, mode)
        return plan_vae(
            chain, self.band_bytes, self.store_limit_bytes, self.store_points, self.store_block_bytes
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """What ``vae.decode(latents).sample`` returns, on the store device."""
        return self._run(latents, encode=False)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """What ``AutoencoderKL._encode`` returns: the latent distribution's mean and log-variance."""
        return self._run(images, encode=True)

    # ------------------------------------------------------------------ passes
    def _run(self, tensor: torch.Tensor, encode: bool) -> torch.Tensor:
        plan = self.plan(tensor.shape, encode)
        self.chain = plan.chain
        self.modules = [self._module(unit, encode) for unit in plan.chain.units]
        # Everything the store counts lies on the store device except the blocks its device share keeps on
        # the compute device: the input, the output and stored keys and values are adopted on the store's
        # side, so the device share holds blocks only (what the cost model's device share is).
        separate = self.store_device != self.device
        self.store = BandStore(self.device, self.store_device if separate else None, self.device_store_bytes)
        self.pass_store_peaks: list[int] = []  # what the store held at most in each pass (bytes)
        self.stores = {
            Point(0): RowBlocks.holding(self.store, tensor.to(self.store_device, self.dtype), parked=True)
        }
        self.statistics: dict[Point, Moments] = {}
        output: torch.Tensor | None = None
        for item in plan.passes:
            self.store.reset_peaks()
            if item.target == plan.chain.output:
                channels, height, width = plan.chain.shape(item.target)
                output = torch.empty(tensor.shape[0], channels, height, width, dtype=self.dtype,
                                     device=self.store_device)  # fmt: skip
                self.store.adopt(output, parked=True)
            if plan.chain.is_attention_output(item.target):
                self._attention_pass(item)
            else:
                self._stream(item, output)
            self.pass_store_peaks.append(self.store.total_peak)
            if item.release:  # its rows were freed as they were read
                self.stores.pop(item.source, None)
                self.stores.pop(Point(item.source.unit), None)
        assert output is not None
        return output

    def _new_store(self, point: Point) -> RowBlocks:
        channels, height, width = self.chain.shape(point)
        shape = (self.chain.batch, channels, height, width)
        return RowBlocks(self.store, shape, self.dtype, self.store_block_bytes)

    def _written(self, item: Pass) -> list[Point]:
        """The tensors a pass writes for its stored point (an inner point: its block's input too)."""
        if item.store is None:
            return []
        if item.store.inner and item.source != Point(item.store.unit):
            return [Point(item.store.unit), item.store]
        return [item.store]

    def _stream(self, item: Pass, output: torch.Tensor | None) -> None:
        chain, source = self.chain, item.source
        listeners: dict[Point, list[Callable[[torch.Tensor], None]]] = {}
        for point in self._written(item):
            self.stores[point] = self._new_store(point)
            listeners.setdefault(point, []).append(self.stores[point].append)
        if output is not None:
            cursor = [0]

            def write(rows: torch.Tensor) -> None:
                output[:, :, cursor[0] : cursor[0] + rows.shape[2]] = rows.to(output.device)
                cursor[0] += rows.shape[2]

            listeners.setdefault(item.target, []).append(write)
        else:
            statistics = Moments.empty(chain.batch, chain.shape(item.target).channels, self.device)
            self.statistics[item.target] = statistics
            listeners.setdefault(item.target, []).append(statistics.add)
        stages: list[tuple[Point, Stage]] = []
        point = source
        for following in chain.between(source, item.target):
            stages.append((following, self._stage(point, source, item.rows, item.release, listeners)))
            point = following
        reading = self.stores[source]
        height = chain.shape(source).height
        start = 0
        while not stages[-1][1].drained:
            rows: torch.Tensor | None = None
            if start < height:  # read the next chunk; once all is read, push nothing until every stage drains
                stop = min(height, start + item.rows)
                rows = reading.read(start, stop)
                if item.release:
                    reading.release_before(stop)
                for listener in listeners.get(source, ()):
                    listener(rows)
                start = stop
            last = start == height  # per stage: nothing more will come from upstream
            for following, stage in stages:
                rows = stage.push(rows, last)
                last = last and stage.drained
                if rows is None and not last:
                    break
                for listener in listeners.get(following, ()) if rows is not None else ():
                    listener(rows)

    def _stage(self, point: Point, source: Point, rows: int, release: bool, listeners: dict) -> Stage:
        """The stage from ``point`` to the next point; wires a ResNet block's residual rows."""
        chain = self.chain
        unit, module = chain.units[point.unit], self.modules[point.unit]
        height = chain.shape(point).height
        following = chain.between(point, chain.output)[0]
        max_rows = rows_at(chain, source, following, rows)
        if unit.kind == "conv":
            conv, norm = module
            normalize = self.statistics[point].normalizer(norm) if norm is not None else None
            return ConvStage(conv, unit.resample, height, max_rows, normalize)
        if not point.inner:
            normalize = self.statistics[point].normalizer(module.norm1)
            return ConvStage(module.conv1, "same", height, max_rows, normalize)
        if source == point:  # resuming inside the block: its input comes from the store
            residual = ResidualRows(self.stores[Point(point.unit)], release)
        else:
            residual = ResidualRows()
            listeners.setdefault(Point(point.unit), []).append(residual.append)
        normalize = self.statistics[point].normalizer(module.norm2)
        conv = ConvStage(module.conv2, "same", height, max_rows, normalize)
        return ResidualStage(conv, module, residual)

    # ------------------------------------------------------------------ attention
    def _attention_pass(self, item: Pass) -> None:
        """The mid-block self-attention over all tokens, chunk by chunk, with the kernel the chunks chose
        (:mod:`.attention`)."""
        chain, attention = self.chain, self.modules[item.source.unit]
        chunks = attention_chunks(chain, item.source.unit, self.band_bytes)
        source = self.stores[item.source]
        channels, height, width = chain.shape(item.source)
        batch = chain.batch
        normalize = self.statistics[item.source].normalizer(attention.group_norm)

        def tokens(start: int, stop: int) -> torch.Tensor:
            band = normalize(source.read(start, stop)).to(self.dtype)
            return band.flatten(2).transpose(1, 2)  # (B, rows * W, C)

        def key_value_bands() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for start in range(0, height, chunks.rows):
                band = tokens(start, min(height, start + chunks.rows))
                yield (
                    split_heads(attention, attention.to_k(band)),
                    split_heads(attention, attention.to_v(band)),
                )

        adopted: list[StoredActivation] = []  # keys and values in the store for the length of this pass
        if chunks.kernel == LINEAR:
            attend = linear_reader(attention, key_value_bands(), height * width, self.device)
        elif chunks.kernel == SOFTMAX:
            attend = softmax_reader(attention, key_value_bands())
        else:  # SOFTMAX_KEY_CHUNKS
            stored = [(k.to(self.store_device), v.to(self.store_device)) for k, v in key_value_bands()]
            adopted = [self.store.adopt(tensor, parked=True) for pair in stored for tensor in pair]

            def attend(query: torch.Tensor) -> torch.Tensor:
                return softmax_in_key_chunks(query, stored, attention.scale)

        out = self._new_store(item.target)
        statistics = Moments.empty(batch, channels, self.device)
        for start in range(0, height, chunks.query_rows):
            stop = min(height, start + chunks.query_rows)
            query = split_heads(attention, attention.to_q(tokens(start, stop)))
            # softmax in key chunks, and the linear state's reference read, return float32
            attended = output_projection(attention, attend(query).to(self.dtype))
            attended = attended.transpose(1, 2).reshape(batch, channels, stop - start, width)
            result = (attended + source.read(start, stop)) / attention.rescale_output_factor
            if item.release:
                source.release_before(stop)
            statistics.add(result)
            out.append(result)
        self.stores[item.target] = out
        self.statistics[item.target] = statistics
        for tensor in adopted:
            self.store.release(tensor)

    # ------------------------------------------------------------------ modules
    def _module(self, unit: Unit, encode: bool) -> Any:
        """The VAE's module for ``unit``, checked against what the tiler computes (:mod:`.checks`): the
        module itself for a ResNet block or the attention, ``(conv, norm or None)`` for a conv unit."""
        try:
            module = self.vae.get_submodule(unit.path)
        except AttributeError as error:
            raise UnsupportedVAE(f"exact tiling does not support this VAE: no {unit.path}") from error
        if unit.kind == "attention":
            check_attention(module, unit.heads)
            return module
        if unit.kind == "resnet":
            check_resnet(module, unit.in_channels, unit.out_channels, unit.shortcut)
            return module
        conv = module
        if unit.resample == "up":
            check_upsampler(module, unit.in_channels, unit.out_channels)
            conv = module.conv
        elif unit.resample == "down":
            check_downsampler(module, unit.in_channels, unit.out_channels)
            conv = module.conv
        else:
            check_conv(conv, unit.in_channels, unit.out_channels, unit.kernel, 1, unit.kernel // 2)
        norm = None
        if unit.norm_path is not None:
            part = "encoder" if encode else "decoder"
            check(isinstance(self.vae.get_submodule(f"{part}.conv_act"), nn.SiLU), f"{part} activation")
            norm = self.vae.get_submodule(unit.norm_path)
            check(isinstance(norm, nn.GroupNorm), f"{part} output norm")
        return conv, norm


def tiled_decode(vae: nn.Module, latents: torch.Tensor, **options: Any) -> torch.Tensor:
    """``vae.decode(latents).sample`` computed pass by pass, exactly (see :class:`ExactTiler`)."""
    return ExactTiler(vae, **options).decode(latents)


def tiled_encode_moments(vae: nn.Module, images: torch.Tensor, **options: Any) -> torch.Tensor:
    """The moments ``vae._encode(images)`` returns, computed pass by pass, exactly."""
    return ExactTiler(vae, **options).encode_moments(images)


__all__ = ["ExactTiler", "tiled_decode", "tiled_encode_moments"]
