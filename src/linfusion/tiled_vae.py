"""Exact tiled VAE encode and decode: any size, bounded memory, no seams.

diffusers' own ``enable_tiling`` runs every tile through the network on its own, so each tile normalizes
with its own GroupNorm statistics (visible seams, colour shifts). Here the encoder or decoder runs as a
chain of layers streamed over row chunks instead, and every GroupNorm uses whole-image statistics:

- the chain is made of *units* (a convolution, a ResNet block, the mid-block attention) joined at *points*:
  the activations between units, plus the output of the first convolution inside each ResNet block (the
  input of its second GroupNorm);
- a *pass* streams row chunks from a stored point (its *source*) through the units up to a *target* point.
  Every convolution keeps the halo rows its next outputs need, so each output row is computed once per
  pass and equals what the whole-image convolution computes. The pass sums the target's values and squares
  per channel (float64 across chunks): the statistics the GroupNorm reading the target needs;
- the program is one pass per GroupNorm input, in order, then a last pass that writes the output. A pass
  may *store* a point it crosses (rows written as they are produced); later passes start there instead of
  recomputing from further back. The store keeps whole-row blocks of about 32 MiB; a pass that replaces
  its source by a newer stored point frees the source's blocks as it reads them, so the store holds about
  the larger of the two, not their sum;
- the mid-block self-attention is global: keys and values of all tokens are built chunk by chunk and the
  queries attend to them in chunks (exact softmax; when the keys and values do not fit the chunk budget
  they go to the store and are read in chunks with a running log-sum-exp). With the linear VAE attention
  (:mod:`linfusion.vae_attention`) one pass sums every chunk's key/value state and a second reads it.

Which points to store is a budget question. Storing everything (``store_limit_bytes=None``) computes every layer
once, the plain VAE's FLOPs, with about two activations of the largest layer in the store; storing less
recomputes more. :func:`plan_vae` picks, for a store budget, the stored points that minimise the FLOPs (a
dynamic programme over the passes), and :func:`tiled_vae_cost` reports that plan's device and host peaks
and FLOPs analytically, without running anything (the memory planner calls it).

The result equals the untiled VAE up to float summation order. Working memory on the compute device is the
chunks of one pass (about ``band_bytes``); the store sits on ``store_device`` (the VAE's device by default;
``"cpu"`` keeps only chunks on the GPU, or also ``device_store_bytes`` of the store).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .ops.reference import linear_attention_from_state, linear_attention_state
from .vae_attention import check_vae_attention, is_linear, output_projection, split_heads

DEFAULT_BAND_BYTES = 256 * 2**20
# The store allocates whole-row blocks of about this size and frees a block once all its rows were read.
# 32 MiB is glibc's largest dynamic mmap threshold: blocks this large are mapped and unmapped on their own,
# so freed ones go back to the system instead of fragmenting the heap (measured: with ~2 MiB chunks the
# CPU peak RSS sat 30 % above the live bytes).
DEFAULT_STORE_BLOCK_BYTES = 32 * 2**20
_FP32 = 4


class UnsupportedVAE(NotImplementedError):
    """The VAE has a layer the exact tiler does not know; use the untiled VAE or diffusers' tiling."""


class StoreBudgetError(MemoryError):
    """No choice of stored points fits ``store_limit_bytes``; ``minimum`` is the smallest budget that does."""

    def __init__(self, budget: int, minimum: int):
        self.budget, self.minimum = budget, minimum
        super().__init__(
            f"the exact tiled VAE needs a store of at least {minimum / 2**30:.3f} GiB at this size "
            f"(store_limit_bytes is {budget / 2**30:.3f} GiB); raise store_limit_bytes or use a smaller size"
        )


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise UnsupportedVAE(f"exact tiling does not support this VAE: {what}")


# ------------------------------------------------------------------------------------------- structure
@dataclass(frozen=True)
class Unit:
    """One layer of the chain: ``conv`` (optionally GroupNorm + SiLU first), ``resnet`` or ``attention``."""

    kind: str
    path: str  # the module inside the VAE
    in_channels: int
    out_channels: int
    resample: str = "same"  # conv units: "same", "up" (nearest x2, then the conv) or "down" (stride 2)
    kernel: int = 3
    norm_path: str | None = None  # conv units: the GroupNorm applied (then SiLU) before the conv
    shortcut: bool = False  # resnet units: a 1x1 conv on the residual
    heads: int = 1  # attention units


def vae_units(config: Mapping[str, Any], encode: bool) -> list[Unit]:
    """The chain of an ``AutoencoderKL`` with this config: the encoder's (image to moments) or decoder's."""
    get = config.get
    channels = list(get("block_out_channels", (64,)))
    layers = get("layers_per_block", 1)
    latent = get("latent_channels", 4)
    block_types = tuple(get("down_block_types" if encode else "up_block_types", ()))
    expected = "DownEncoderBlock2D" if encode else "UpDecoderBlock2D"
    _check(all(kind == expected for kind in block_types), f"block types {block_types}")
    _check(len(block_types) == len(channels), "one block per block_out_channels entry")
    part = "encoder" if encode else "decoder"

    def resnets(prefix: str, count: int, in_channels: int, out_channels: int) -> list[Unit]:
        return [
            Unit("resnet", f"{prefix}.resnets.{index}", in_channels if index == 0 else out_channels,
                 out_channels, shortcut=index == 0 and in_channels != out_channels)
            for index in range(count)
        ]  # fmt: skip

    def mid_block(width: int) -> list[Unit]:
        units = resnets(f"{part}.mid_block", 1, width, width)
        if get("mid_block_add_attention", True):
            units.append(Unit("attention", f"{part}.mid_block.attentions.0", width, width))
        return [*units, Unit("resnet", f"{part}.mid_block.resnets.1", width, width)]

    units: list[Unit] = []
    if encode:
        units.append(Unit("conv", "encoder.conv_in", get("in_channels", 3), channels[0]))
        previous = channels[0]
        for index, width in enumerate(channels):
            units += resnets(f"encoder.down_blocks.{index}", layers, previous, width)
            if index < len(channels) - 1:
                path = f"encoder.down_blocks.{index}.downsamplers.0"
                units.append(Unit("conv", path, width, width, resample="down"))
            previous = width
        units += mid_block(channels[-1])
        units.append(
            Unit("conv", "encoder.conv_out", channels[-1], 2 * latent, norm_path="encoder.conv_norm_out")
        )
        if get("use_quant_conv", True):
            units.append(Unit("conv", "quant_conv", 2 * latent, 2 * latent, kernel=1))
        return units
    if get("use_post_quant_conv", True):
        units.append(Unit("conv", "post_quant_conv", latent, latent, kernel=1))
    units.append(Unit("conv", "decoder.conv_in", latent, channels[-1]))
    units += mid_block(channels[-1])
    previous = channels[-1]
    for index, width in enumerate(channels[::-1]):
        units += resnets(f"decoder.up_blocks.{index}", layers + 1, previous, width)
        if index < len(channels) - 1:
            units.append(Unit("conv", f"decoder.up_blocks.{index}.upsamplers.0", width, width, resample="up"))
        previous = width
    out_channels = get("out_channels", 3)
    units.append(
        Unit("conv", "decoder.conv_out", channels[0], out_channels, norm_path="decoder.conv_norm_out")
    )
    return units


class Point(NamedTuple):
    """A place in the chain: the input of unit ``unit`` or, with ``inner``, its first conv's output."""

    unit: int
    inner: bool = False


class Shape(NamedTuple):
    channels: int
    height: int
    width: int


class Chain:
    """The units of one encode or decode at one input size: shapes, bytes and FLOPs of every point."""

    def __init__(self, units: Sequence[Unit], batch: int, height: int, width: int, element_size: int,
                 attention: str = "exact"):  # fmt: skip
        self.units = list(units)
        self.batch, self.element_size, self.attention = batch, element_size, attention
        self.cut_shapes = [Shape(self.units[0].in_channels, height, width)]
        for unit in self.units:
            previous = self.cut_shapes[-1]
            factor = {"up": 2.0, "down": 0.5}.get(unit.resample, 1.0)
            self.cut_shapes.append(
                Shape(unit.out_channels, int(previous.height * factor), int(previous.width * factor))
            )
        self.points: list[Point] = []
        for index, unit in enumerate(self.units):
            self.points.append(Point(index))
            if unit.kind == "resnet":
                self.points.append(Point(index, True))
        self.output = Point(len(self.units))
        self.points.append(self.output)
        self._position = {point: index for index, point in enumerate(self.points)}
        self._prefix_flops = [0]
        for point in self.points[:-1]:
            self._prefix_flops.append(self._prefix_flops[-1] + self._step_flops(point))

    def shape(self, point: Point) -> Shape:
        """The activation at ``point`` (at an inner point: the ResNet block's first conv output)."""
        cut = self.cut_shapes[point.unit]
        return Shape(self.units[point.unit].out_channels, cut.height, cut.width) if point.inner else cut

    def tensor_bytes(self, point: Point) -> int:
        channels, height, width = self.shape(point)
        return self.batch * channels * height * width * self.element_size

    def row_bytes(self, point: Point) -> int:
        channels, _, width = self.shape(point)
        return self.batch * channels * width * self.element_size

    def resume_bytes(self, point: Point) -> int:
        """What must be stored to start a pass at ``point`` (an inner point needs its block's input too)."""
        extra = self.tensor_bytes(Point(point.unit)) if point.inner else 0
        return self.tensor_bytes(point) + extra

    def between(self, first: Point, last: Point) -> list[Point]:
        """The points after ``first`` up to ``last``, in order."""
        return self.points[self._position[first] + 1 : self._position[last] + 1]

    def is_attention_output(self, point: Point) -> bool:
        return not point.inner and point.unit > 0 and self.units[point.unit - 1].kind == "attention"

    def is_attention_input(self, point: Point) -> bool:
        return not point.inner and point.unit < len(self.units) and self.units[point.unit].kind == "attention"

    def targets(self) -> list[Point]:
        """The points whose statistics a GroupNorm reads, in order, then the output."""
        targets = {self.output}
        for index, unit in enumerate(self.units):
            if unit.kind == "resnet":
                targets |= {Point(index), Point(index, True)}
            elif unit.kind == "attention":
                targets |= {Point(index), Point(index + 1)}
            elif unit.norm_path is not None:
                targets.add(Point(index))
        _check(Point(0) not in targets, "a GroupNorm on the input")
        return sorted(targets)

    def level_inputs(self) -> set[Point]:
        """Each resolution level's input at its own resolution (before an upsampler, after a downsampler),
        and every point at the lowest resolution (the mid-block's level)."""
        lowest = min(shape.height for shape in self.cut_shapes)
        points = {point for point in self.points if self.shape(point).height == lowest}
        for index, unit in enumerate(self.units):
            if unit.resample == "up":
                points.add(Point(index))
            elif unit.resample == "down":
                points.add(Point(index + 1))
        return points

    def _step_flops(self, point: Point) -> int:
        """FLOPs from ``point`` to the next point, counted as torch's FlopCounterMode counts them."""
        unit = self.units[point.unit]
        channels, height, width = self.cut_shapes[point.unit + 1]
        pixels = self.batch * height * width
        if unit.kind == "conv":
            return 2 * pixels * unit.in_channels * unit.out_channels * unit.kernel**2
        if unit.kind == "resnet" and not point.inner:
            return 2 * pixels * unit.in_channels * unit.out_channels * 9
        if unit.kind == "resnet":
            shortcut = 2 * pixels * unit.in_channels * unit.out_channels if unit.shortcut else 0
            return 2 * pixels * unit.out_channels**2 * 9 + shortcut
        return attention_flops(self.batch, height * width, channels, self.attention, unit.heads)

    def flops(self, source: Point, target: Point) -> int:
        """FLOPs of a pass streaming ``source`` -> ``target``."""
        return self._prefix_flops[self._position[target]] - self._prefix_flops[self._position[source]]

    @property
    def plain_flops(self) -> int:
        return self._prefix_flops[-1]


def attention_flops(batch: int, tokens: int, channels: int, mode: str, heads: int = 1) -> int:
    """The mid-block attention: four projections, then softmax (quadratic) or linear attention."""
    projections = 4 * 2 * batch * tokens * channels * channels
    if mode == "linear":  # the state phi(K)^T V, its read phi(Q) S, the normalizer phi(Q) . mean phi(K)
        return (
            projections
            + 2 * (2 * batch * tokens * channels * (channels // heads))
            + 2 * batch * tokens * channels
        )
    return projections + 2 * (2 * batch * tokens * tokens * channels)


# ------------------------------------------------------------------------------------------- memory model
def _rows_at(chain: Chain, source: Point, point: Point, rows: int) -> int:
    """Rows of ``point`` a chunk of ``rows`` source rows becomes (resolutions differ by powers of two)."""
    return max(1, math.ceil(rows * chain.shape(point).height / chain.shape(source).height))


def working_bytes(chain: Chain, source: Point, target: Point, rows: int) -> int:
    """Device bytes of live tensors while a pass streams chunks of ``rows`` source rows.

    Held between chunks: every 3x3 convolution keeps 2 halo rows of its input, every ResNet block 2 rows
    of its residual. On top, the largest phase of any step: normalizing the input chunk (float32
    temporaries); the convolution (input chunk, normalized chunk, upsampled rows, the halo-extended window
    and its padded copy, output); the residual add; the float32 copy and square of the target's rows that
    its statistics are summed from.
    """
    element = chain.element_size

    def float32(size: int) -> int:  # bytes of a float32 copy of ``size`` bytes of activations
        return size * _FP32 // element

    held, largest = 0, 0
    point = source
    for following in chain.between(source, target):
        unit = chain.units[point.unit]
        in_rows, out_rows = _rows_at(chain, source, point, rows), _rows_at(chain, source, following, rows)
        chunk, out = in_rows * chain.row_bytes(point), out_rows * chain.row_bytes(following)
        normalized = unit.kind == "resnet" or unit.norm_path is not None
        up = unit.resample == "up"
        conv_row = chain.row_bytes(point) * (2 if up else 1)
        halo = 2 if unit.kernel == 3 else 0
        window = (in_rows * (2 if up else 1) + halo) * conv_row
        residual = 0
        if unit.kind == "resnet":  # the block input rows buffered for the residual
            residual_row = chain.row_bytes(Point(point.unit))
            if not (point.inner and source == point):
                held += 2 * residual_row
                residual = in_rows * residual_row if not point.inner else out_rows * residual_row
        held += halo * conv_row
        phases = [chunk + (4 if up else 0) * chunk + 2 * window + out + residual]
        if normalized:
            phases.append(chunk + (float32(chunk) if element != _FP32 else 0) + float32(chunk) + residual)
            phases[0] += chunk
        if unit.kind == "resnet" and point.inner:
            shortcut = out if unit.shortcut else 0
            phases.append(chunk + out + out_rows * chain.row_bytes(Point(point.unit)) + shortcut + out)
        if following == target:
            phases.append(out + (float32(out) if element != _FP32 else 0) + float32(out))
        largest = max(largest, *phases)
        point = following
    return held + largest


def _pass_rows(chain: Chain, source: Point, target: Point, band_bytes: int) -> int:
    """The most source rows per chunk whose working memory stays within ``band_bytes`` (at least 1)."""
    height = chain.shape(source).height
    one, two = working_bytes(chain, source, target, 1), working_bytes(chain, source, target, 2)
    slope = max(1, two - one)
    rows = max(1, min(height, (band_bytes - one) // slope + 1))
    while rows > 1 and working_bytes(chain, source, target, rows) > band_bytes:
        rows -= 1
    return rows


@dataclass(frozen=True)
class _AttentionChunks:
    """How the attention pass is chunked: token rows per chunk, query rows, keys/values on the device."""

    rows: int
    query_rows: int
    kv_on_device: bool
    kv_bytes: int
    working_bytes: int


def _attention_chunks(chain: Chain, unit_index: int, band_bytes: int) -> _AttentionChunks:
    """Keys and values stay on the compute device when they take at most half the chunk budget; else they go
    to the store and each query chunk reads them key chunk by key chunk (scores: 3 float32 copies)."""
    unit = chain.units[unit_index]
    channels, height, width = chain.cut_shapes[unit_index]
    batch = chain.batch
    token_row = batch * width * channels * _FP32  # one row of tokens in float32
    softmax = chain.attention != "linear"
    kv_bytes = 2 * batch * height * width * channels * chain.element_size if softmax else 0
    kv_on_device = softmax and kv_bytes <= band_bytes // 2
    available = band_bytes - (kv_bytes if kv_on_device else 0)
    rows = max(1, min(height, available // (8 * token_row)))
    query_rows = rows
    scores_row = 3 * _FP32 * batch * unit.heads * width * width  # scores of one query row x one key row
    if softmax and not kv_on_device:
        rows = max(1, min(rows, math.isqrt(max(1, band_bytes // 2 // scores_row))))
        query_rows = max(1, min(height, available // (8 * token_row), band_bytes // 2 // (scores_row * rows)))
    work = 8 * token_row * max(rows, query_rows) + (kv_bytes if kv_on_device else 0)
    if softmax and not kv_on_device:
        work += scores_row * rows * query_rows
    return _AttentionChunks(rows, query_rows, kv_on_device, kv_bytes, work)


# ------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Pass:
    """Stream ``source`` -> ``target`` in chunks of ``rows`` source rows, storing ``store`` on the way."""

    source: Point
    target: Point
    store: Point | None
    release: bool  # the source's last use: its rows are freed as they are read
    rows: int
    flops: int
    store_bytes: int  # the store's live bytes during the pass (the input included)
    working_bytes: int  # device memory of the chunks


@dataclass
class Plan:
    """The passes of one encode or decode, from :func:`plan_vae`."""

    chain: Chain
    passes: list[Pass]
    band_bytes: int
    block_bytes: int

    @property
    def flops(self) -> int:
        return sum(item.flops for item in self.passes)

    @property
    def store_peak(self) -> int:
        return max(item.store_bytes for item in self.passes)

    @property
    def working_peak(self) -> int:
        return max(item.working_bytes for item in self.passes)

    @property
    def stored(self) -> list[Point]:
        return [item.store for item in self.passes if item.store is not None]

    def peaks(self, device_store_bytes: int | None = 0) -> tuple[int, int]:
        """(device, host) peak bytes when up to ``device_store_bytes`` of the store stay on the compute
        device (None: all of it) and the rest is on the host; chunks fill the device part first."""
        share = math.inf if device_store_bytes is None else device_store_bytes
        device = max(item.working_bytes + min(item.store_bytes, share) for item in self.passes)
        host = max(max(0, item.store_bytes - share) for item in self.passes)
        return int(device), int(host)

    def moved_bytes(self, device_store_bytes: int | None = 0) -> int:
        """Bytes copied between the compute device and a store on the host, both directions summed.

        The input's copy into the store, every read of a stored point and every write of one (the output
        included), and softmax keys and values parked in the store (read once per query chunk). With
        ``device_store_bytes`` of the store on the device, a pass's reads and writes count in the share
        of its store that is on the host (an estimate: the tiler fills the device share first). None: the
        store is on the compute device and nothing moves.
        """
        if device_store_bytes is None:
            return 0
        chain = self.chain
        total = chain.tensor_bytes(Point(0))
        for item in self.passes:
            reads = chain.resume_bytes(item.source)
            parked = 0
            if chain.is_attention_output(item.target):
                reads *= 3  # keys and values, queries, the residual: each a read of the input
                chunks = _attention_chunks(chain, item.source.unit, self.band_bytes)
                if chain.attention != "linear" and not chunks.kv_on_device:
                    height = chain.cut_shapes[item.source.unit].height
                    parked = chunks.kv_bytes * (1 + -(-height // chunks.query_rows))
            writes = chain.tensor_bytes(item.target) if item.target == chain.output else 0
            if item.store is not None:
                keeps_input = item.store.inner and item.source == Point(item.store.unit)
                writes += chain.tensor_bytes(item.store) if keeps_input else chain.resume_bytes(item.store)
            on_host = max(0, item.store_bytes - device_store_bytes) / max(1, item.store_bytes)
            total += round((reads + writes) * on_host) + parked
        return int(total)


def _block_bytes(chain: Chain, point: Point, block_bytes: int) -> int:
    """One store block of the tensors a resume point needs: whole rows, about ``block_bytes`` each."""
    total = 0
    for part in (point, Point(point.unit)) if point.inner else (point,):
        row = chain.row_bytes(part)
        total += min(chain.tensor_bytes(part), -(-block_bytes // row) * row)
    return total


def _store_bytes(
    chain: Chain, source: Point, target: Point, store: Point | None, band_bytes: int, block_bytes: int
) -> int:
    """The store's live bytes during one pass (see the module docstring for what is freed when).

    A pass that supersedes its source frees the source's blocks as it reads them while it fills the new
    point's blocks, so at any moment it holds (1 - f) of one and f of the other, plus at most one
    partly read and one partly filled block.
    """
    held = chain.tensor_bytes(Point(0))  # the input, held by the caller throughout
    read = 0 if source == Point(0) else chain.resume_bytes(source)
    if target == chain.output:  # the output is allocated whole before the pass
        return held + read + chain.tensor_bytes(target)
    if store is None:
        return held + read
    written = chain.resume_bytes(store)
    keys_values = 0
    if chain.is_attention_output(target):
        chunks = _attention_chunks(chain, source.unit, band_bytes)
        keys_values = 0 if chunks.kv_on_device else chunks.kv_bytes
    if source == Point(0) or (store.inner and source == Point(store.unit)):  # nothing is freed
        return held + max(read, written) + keys_values
    slack = _block_bytes(chain, source, block_bytes) + _block_bytes(chain, store, block_bytes)
    return held + min(read + written, max(read, written) + slack) + keys_values


def _search(chain: Chain, band_bytes: int, block_bytes: int, budget: float, peak_first: bool,
            allowed: set[Point] | None) -> list[tuple[Point, Point, Point | None]]:  # fmt: skip
    """Dynamic programme over the passes: after each target, the best way to have each point stored.

    Order: total FLOPs, then peak store bytes (``peak_first`` swaps them, to find the smallest budget).
    A pass stores at most one point (from ``allowed``, None: any), later than the previous target
    (storing it earlier is never worse). The attention's input and output are always stored.
    """
    Entry = tuple[int, int, tuple]  # (flops, peak, passes) or (peak, flops, passes)
    states: dict[Point, Entry] = {Point(0): (0, 0, ())}
    previous = Point(0)
    for target in chain.targets():
        following: dict[Point, Entry] = {}
        for source, (first, second, passes) in states.items():
            flops, peak = (second, first) if peak_first else (first, second)
            if chain.is_attention_output(target):  # the attention pass itself: stored input to stored output
                if source != Point(target.unit - 1):
                    continue
                choices: list[Point | None] = [target]
            elif chain.is_attention_input(target):
                choices = [target]
            elif target == chain.output:
                choices = [None]
            else:
                crossed = chain.between(max(source, previous), target)
                choices = [None, *(point for point in crossed if allowed is None or point in allowed)]
            for store in choices:
                live = _store_bytes(chain, source, target, store, band_bytes, block_bytes)
                if live > budget:
                    continue
                total, top = flops + chain.flops(source, target), max(peak, live)
                entry = ((top, total) if peak_first else (total, top)) + (
                    passes + ((source, target, store),),
                )
                resume = store or source
                if resume not in following or entry[:2] < following[resume][:2]:
                    following[resume] = entry
        states, previous = following, target
    if not states:
        return []
    return min(states.values(), key=lambda entry: entry[:2])[2]


STORE_POINTS = ("any", "level-inputs")


def plan_vae(
    chain: Chain,
    band_bytes: int = DEFAULT_BAND_BYTES,
    store_limit_bytes: int | None = None,
    store_points: str = "any",
    block_bytes: int = DEFAULT_STORE_BLOCK_BYTES,
) -> Plan:
    """The passes that minimise FLOPs with the store within ``store_limit_bytes`` bytes (None: no limit).

    ``store_points``: "any" point may be stored, or only the "level-inputs" (see :meth:`Chain.level_inputs`).
    ``block_bytes``: the store's allocation unit (see ``DEFAULT_STORE_BLOCK_BYTES``).
    """
    if store_points not in STORE_POINTS:
        raise ValueError(f"store_points must be one of {STORE_POINTS}; got {store_points!r}")
    allowed = chain.level_inputs() if store_points == "level-inputs" else None
    budget = math.inf if store_limit_bytes is None else store_limit_bytes
    chosen = _search(chain, band_bytes, block_bytes, budget, peak_first=False, allowed=allowed)
    if not chosen:
        smallest = _search(chain, band_bytes, block_bytes, math.inf, peak_first=True, allowed=allowed)
        minimum = max(_store_bytes(chain, *item, band_bytes, block_bytes) for item in smallest)
        raise StoreBudgetError(int(budget), minimum)
    passes = []
    for source, target, store in chosen:
        keeps_source = store is not None and store.inner and source == Point(store.unit)
        release = source != Point(0) and (target == chain.output or (store is not None and not keeps_source))
        if chain.is_attention_output(target):
            chunks = _attention_chunks(chain, source.unit, band_bytes)
            rows, working = chunks.rows, chunks.working_bytes
        else:
            rows = _pass_rows(chain, source, target, band_bytes)
            working = working_bytes(chain, source, target, rows)
        store_bytes = _store_bytes(chain, source, target, store, band_bytes, block_bytes)
        passes.append(
            Pass(source, target, store, release, rows, chain.flops(source, target), store_bytes, working)
        )
    return Plan(chain, passes, band_bytes, block_bytes)


# ------------------------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class VAECost:
    """What one tiled encode or decode costs, from the plan alone (weights excluded)."""

    device_peak: int  # chunks, plus the part of the store on the compute device
    host_peak: int  # the part of the store on the host
    store_peak: int
    working_peak: int
    flops: int
    plain_flops: int
    passes: int
    stored: tuple[Point, ...]
    moved_bytes: int = 0  # copied between the compute device and the host part of the store

    @property
    def overhead(self) -> float:
        """FLOPs of the tiled path over the plain VAE's."""
        return self.flops / self.plain_flops


def tiled_vae_cost(
    vae_config: Mapping[str, Any],
    width: int,
    height: int,
    *,
    dtype: torch.dtype = torch.float16,
    batch: int = 1,
    band_bytes: int = DEFAULT_BAND_BYTES,
    store_limit_bytes: int | None = None,
    encode: bool = False,
    device_store_bytes: int | None = 0,
    store_points: str = "any",
    attention: str = "exact",
    block_bytes: int = DEFAULT_STORE_BLOCK_BYTES,
) -> VAECost:
    """Peaks and FLOPs of the exact tiled VAE for a ``width`` x ``height`` image, in milliseconds.

    ``store_limit_bytes``: bytes the whole store may hold (None: no limit); ``device_store_bytes``: how much
    of it may stay on the compute device (None: all, as with ``store_device`` the VAE's device), the rest
    is on the host. ``attention``: "exact" (the VAE's softmax) or "linear"
    (:mod:`linfusion.vae_attention`). Raises :class:`StoreBudgetError` when no plan fits.
    """
    chain = _chain(vae_config, width, height, dtype, batch, encode, attention)
    plan = plan_vae(chain, band_bytes, store_limit_bytes, store_points, block_bytes)
    device_peak, host_peak = plan.peaks(device_store_bytes)
    return VAECost(
        device_peak=device_peak,
        host_peak=host_peak,
        store_peak=plan.store_peak,
        working_peak=plan.working_peak,
        flops=plan.flops,
        plain_flops=plan.chain.plain_flops,
        passes=len(plan.passes),
        stored=tuple(plan.stored),
        moved_bytes=plan.moved_bytes(device_store_bytes),
    )


def _chain(config: Mapping[str, Any], width: int, height: int, dtype: torch.dtype, batch: int, encode: bool,
           attention: str) -> Chain:  # fmt: skip
    if attention not in ("exact", "linear"):
        raise ValueError(f"attention must be 'exact' or 'linear'; got {attention!r}")
    factor = 2 ** (len(config.get("block_out_channels", (64,))) - 1)
    if not encode:
        height, width = height // factor, width // factor
    element_size = torch.empty((), dtype=dtype).element_size()
    return Chain(vae_units(config, encode), batch, height, width, element_size, attention)


# ------------------------------------------------------------------------------------------- execution
class StoreUsage:
    """Bytes the store holds now and at most since the last :meth:`restart` (the tiler's own count), and
    the part of it kept on the compute device (at most ``device_share``)."""

    def __init__(self, device_share: int = 0) -> None:
        self.live = self.peak = self.device_live = 0
        self.device_share = device_share

    def add(self, size: int, on_device: bool = False) -> None:
        self.live += size
        self.peak = max(self.peak, self.live)
        if on_device:
            self.device_live += size

    def restart(self) -> None:
        self.peak = self.live


class _RowStore:
    """An activation kept in blocks of whole rows, freed block by block once read: on the compute device
    while the usage's device share has room, else on the store device."""

    def __init__(self, device: torch.device, compute_device: torch.device, usage: StoreUsage, height: int,
                 block_bytes: int):  # fmt: skip
        self.device, self.compute_device, self.usage = device, compute_device, usage
        self.height, self.block_bytes = height, block_bytes
        self.blocks: list[torch.Tensor | None] = []
        self.on_device: list[bool] = []
        self.starts: list[int] = []
        self.rows = 0  # rows written
        self._first_kept = 0

    @classmethod
    def holding(cls, tensor: torch.Tensor, compute_device: torch.device, usage: StoreUsage) -> _RowStore:
        """The caller's tensor itself, as one block (never freed here)."""
        store = cls(tensor.device, compute_device, usage, tensor.shape[2], 0)
        store.blocks, store.on_device, store.starts, store.rows = [tensor], [False], [0], tensor.shape[2]
        usage.add(tensor.numel() * tensor.element_size())
        return store

    def append(self, rows: torch.Tensor) -> None:
        written = 0
        while written < rows.shape[2]:
            block = self.blocks[-1] if self.blocks else None
            filled = self.rows - self.starts[-1] if self.blocks else 0
            if block is None or filled == block.shape[2]:
                block, filled = self._new_block(rows), 0
            count = min(rows.shape[2] - written, block.shape[2] - filled)
            block[:, :, filled : filled + count] = rows[:, :, written : written + count]
            written += count
            self.rows += count

    def _new_block(self, rows: torch.Tensor) -> torch.Tensor:
        batch, channels, _, width = rows.shape
        row_bytes = batch * channels * width * rows.element_size()
        block_rows = min(self.height - self.rows, max(1, -(-self.block_bytes // row_bytes)))
        size = block_rows * row_bytes
        on_device = self.usage.device_live + size <= self.usage.device_share
        device = self.compute_device if on_device else self.device
        block = torch.empty(batch, channels, block_rows, width, dtype=rows.dtype, device=device)
        self.blocks.append(block)
        self.on_device.append(on_device)
        self.starts.append(self.rows)
        self.usage.add(size, on_device)
        return block

    def read(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        index = bisect.bisect_right(self.starts, start) - 1
        parts = []
        while index < len(self.blocks) and self.starts[index] < stop:
            block = self.blocks[index]
            assert block is not None, "rows read after they were freed"
            first = self.starts[index]
            parts.append(block[:, :, max(start, first) - first : stop - first])
            index += 1
        rows = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return rows.to(device)

    def release(self, stop: int) -> None:
        """Free the blocks that end at or before row ``stop``."""
        while self._first_kept < len(self.blocks):
            block = self.blocks[self._first_kept]
            if block is not None and self.starts[self._first_kept] + block.shape[2] > stop:
                break
            if block is not None:
                self.usage.add(-block.numel() * block.element_size(), self.on_device[self._first_kept])
            self.blocks[self._first_kept] = None
            self._first_kept += 1


class _Statistics:
    """Per-(sample, channel) sums and sums of squares of one activation: float32 per chunk, float64 across."""

    def __init__(self, shape: Shape, batch: int, device: torch.device):
        self.count = shape.height * shape.width
        self.sums = torch.zeros(batch, shape.channels, dtype=torch.float64, device=device)
        self.squares = torch.zeros_like(self.sums)

    def add(self, rows: torch.Tensor) -> None:
        values = rows if rows.dtype == torch.float64 else rows.float()
        self.sums += values.sum(dim=(2, 3)).double()
        self.squares += values.square().sum(dim=(2, 3)).double()

    def affine(self, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-(sample, channel) scale and shift that apply ``norm`` with these whole-image statistics."""
        batch, channels = self.sums.shape
        groups = norm.num_groups
        count = self.count * (channels // groups)
        mean = self.sums.view(batch, groups, -1).sum(-1) / count
        variance = (self.squares.view(batch, groups, -1).sum(-1) / count - mean.square()).clamp_min(0.0)
        inverse = (variance + norm.eps).rsqrt()
        mean = mean.repeat_interleave(channels // groups, dim=1)
        inverse = inverse.repeat_interleave(channels // groups, dim=1)
        weight = norm.weight.double() if norm.affine else torch.ones_like(mean)
        bias = norm.bias.double() if norm.affine else torch.zeros_like(mean)
        scale = inverse * weight
        shift = bias - mean * scale
        return scale.float()[:, :, None, None], shift.float()[:, :, None, None]


def _normalize(rows: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``silu(norm(rows))`` in float32, back in the rows' dtype."""
    if affine is None:
        return rows
    normalized = torch.addcmul(affine[1], rows.float(), affine[0])
    return F.silu(normalized, inplace=True).to(rows.dtype)


class _ConvStage:
    """One convolution streamed over row chunks; keeps the input rows its next outputs still need."""

    def __init__(self, conv: nn.Conv2d, resample: str, in_height: int, max_rows: int, affine: Any = None):
        self.conv, self.resample, self.affine = conv, resample, affine
        self.max_rows = max_rows  # output rows per push: the drain at the end stays chunk-sized too
        self.halo = conv.kernel_size[0] // 2
        self.in_height = 2 * in_height if resample == "up" else in_height  # rows the conv itself reads
        self.out_height = in_height // 2 if resample == "down" else self.in_height
        self.buffer: torch.Tensor | None = None  # conv input rows [self.kept_from, self.received)
        self.kept_from = self.received = self.produced = 0

    @property
    def drained(self) -> bool:
        return self.produced == self.out_height

    def push(self, rows: torch.Tensor | None, last: bool) -> torch.Tensor | None:
        """Take input rows (``last``: no more will come); return the output rows now computable, if any."""
        if rows is not None:
            rows = _normalize(rows, self.affine)
            if self.resample == "up":
                rows = F.interpolate(rows, scale_factor=2.0, mode="nearest")
            self.buffer = rows if self.buffer is None else torch.cat([self.buffer, rows], dim=2)
            self.received += rows.shape[2]
        if last:
            ready = self.out_height
        elif self.resample == "down":  # output row r reads input rows 2r .. 2r + 2
            ready = (self.received - 1) // 2
        else:
            ready = self.received - self.halo
        start = self.produced
        stop = min(ready, self.out_height, start + self.max_rows)
        if stop <= start:
            return None
        weight, bias = self.conv.weight, self.conv.bias
        if self.resample == "down":  # diffusers pads right and bottom by one, then strides by 2
            first, last_row = 2 * start, min(self.in_height, 2 * stop + 1)
            window = F.pad(self._rows(first, last_row), (0, 1, 0, 2 * stop + 1 - last_row))
            out = F.conv2d(window, weight, bias, stride=2)
            keep = 2 * stop
        else:
            halo = self.halo
            first, last_row = max(0, start - halo), min(self.in_height, stop + halo)
            window = self._rows(first, last_row)
            top, bottom = first - (start - halo), (stop + halo) - last_row
            if top or bottom:
                window = F.pad(window, (0, 0, top, bottom))
            out = F.conv2d(window, weight, bias, padding=(0, halo))
            keep = stop - halo
        del window
        self.produced = stop
        self._drop_before(self.in_height if stop == self.out_height else keep)
        return out

    def _rows(self, first: int, stop: int) -> torch.Tensor:
        assert self.buffer is not None and first >= self.kept_from
        return self.buffer[:, :, first - self.kept_from : stop - self.kept_from]

    def _drop_before(self, row: int) -> None:
        if self.buffer is None or row <= self.kept_from:
            return
        rest = self.buffer[:, :, row - self.kept_from :]
        self.buffer = rest.clone() if rest.shape[2] else None  # a copy: the old chunk is freed
        self.kept_from = row


class _ResidualRows:
    """The residual rows a ResNet block's second conv adds: buffered as they pass, or read from the store."""

    def __init__(self, store: _RowStore | None = None, release: bool = False, device: Any = None):
        self.store, self.release, self.device = store, release, device
        self.buffer: torch.Tensor | None = None
        self.position = 0

    def append(self, rows: torch.Tensor) -> None:
        self.buffer = rows if self.buffer is None else torch.cat([self.buffer, rows], dim=2)

    def take(self, count: int) -> torch.Tensor:
        start, self.position = self.position, self.position + count
        if self.store is not None:
            rows = self.store.read(start, self.position, self.device)
            if self.release:
                self.store.release(self.position)
            return rows
        assert self.buffer is not None
        rows, rest = self.buffer[:, :, :count], self.buffer[:, :, count:]
        self.buffer = rest.clone() if rest.shape[2] else None
        return rows


class _ResidualStage:
    """A ResNet block's second half: ``(shortcut(residual) + conv2(silu(norm2(h)))) / output_scale``."""

    def __init__(self, conv: _ConvStage, block: nn.Module, residual: _ResidualRows):
        self.conv, self.block, self.residual = conv, block, residual

    @property
    def drained(self) -> bool:
        return self.conv.drained

    def push(self, rows: torch.Tensor | None, last: bool) -> torch.Tensor | None:
        out = self.conv.push(rows, last)
        if out is None:
            return None
        residual = self.residual.take(out.shape[2])
        if self.block.conv_shortcut is not None:
            residual = self.block.conv_shortcut(residual)
        out = residual + out
        if self.block.output_scale_factor != 1:
            out = out / self.block.output_scale_factor
        return out


Stage = _ConvStage | _ResidualStage


class ExactTiler:
    """Runs an ``AutoencoderKL``'s encoder or decoder pass by pass (see the module docstring).

    ``band_bytes``: device working memory of a pass's chunks. ``store_limit_bytes``: bytes the store may hold
    at once (None: no limit, so nothing is recomputed); :func:`plan_vae` picks what to store and what to
    recompute within it (``store_points="level-inputs"`` restricts it to the levels' inputs).
    ``store_device``: where the store lives (default: the VAE's device); when that is another device,
    up to ``device_store_bytes`` of it still stay on the VAE's device (filled first). ``store_block_bytes``:
    the store's allocation unit. After a run, ``pass_store_peaks`` holds the bytes the store held at most
    during each pass of the plan (its own count).
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
        self.usage = StoreUsage(self.device_store_bytes)
        self.pass_store_peaks: list[int] = []  # what the store held at most in each pass (bytes)
        self.stores = {
            Point(0): _RowStore.holding(tensor.to(self.store_device, self.dtype), self.device, self.usage)
        }
        self.statistics: dict[Point, _Statistics] = {}
        output: torch.Tensor | None = None
        for item in plan.passes:
            self.usage.restart()
            if item.target == plan.chain.output:
                channels, height, width = plan.chain.shape(item.target)
                output = torch.empty(tensor.shape[0], channels, height, width, dtype=self.dtype,
                                     device=self.store_device)  # fmt: skip
                self.usage.add(output.numel() * output.element_size())
            if plan.chain.is_attention_output(item.target):
                self._attention_pass(item)
            else:
                self._stream(item, output)
            self.pass_store_peaks.append(self.usage.peak)
            if item.release:  # its rows were freed as they were read
                self.stores.pop(item.source, None)
                self.stores.pop(Point(item.source.unit), None)
        assert output is not None
        return output

    def _new_store(self, point: Point) -> _RowStore:
        height = self.chain.shape(point).height
        return _RowStore(self.store_device, self.device, self.usage, height, self.store_block_bytes)

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
            statistics = _Statistics(chain.shape(item.target), chain.batch, self.device)
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
                rows = reading.read(start, stop, self.device)
                if item.release:
                    reading.release(stop)
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
        max_rows = _rows_at(chain, source, following, rows)
        if unit.kind == "conv":
            conv, norm = module
            affine = self.statistics[point].affine(norm) if norm is not None else None
            return _ConvStage(conv, unit.resample, height, max_rows, affine)
        if not point.inner:
            affine = self.statistics[point].affine(module.norm1)
            return _ConvStage(module.conv1, "same", height, max_rows, affine)
        if source == point:  # resuming inside the block: its input comes from the store
            residual = _ResidualRows(self.stores[Point(point.unit)], release, self.device)
        else:
            residual = _ResidualRows()
            listeners.setdefault(Point(point.unit), []).append(residual.append)
        conv = _ConvStage(module.conv2, "same", height, max_rows, self.statistics[point].affine(module.norm2))
        return _ResidualStage(conv, module, residual)

    # ------------------------------------------------------------------ attention
    def _attention_pass(self, item: Pass) -> None:
        """The mid-block self-attention over all tokens, chunk by chunk (see the module docstring)."""
        chain, attention = self.chain, self.modules[item.source.unit]
        chunks = _attention_chunks(chain, item.source.unit, self.band_bytes)
        source = self.stores[item.source]
        channels, height, width = chain.shape(item.source)
        batch = chain.batch
        scale, shift = self.statistics[item.source].affine(attention.group_norm)

        def tokens(start: int, stop: int) -> torch.Tensor:
            band = source.read(start, stop, self.device)
            band = (band.float() * scale + shift).to(self.dtype)
            return band.flatten(2).transpose(1, 2)  # (B, rows * W, C)

        def key_value_bands() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for start in range(0, height, chunks.rows):
                band = tokens(start, min(height, start + chunks.rows))
                yield (
                    split_heads(attention, attention.to_k(band)),
                    split_heads(attention, attention.to_v(band)),
                )

        if is_linear(attention):
            attend = self._linear_reader(attention, key_value_bands(), height * width)
        elif chunks.kv_on_device:
            keys, values = zip(*key_value_bands())
            key, value = torch.cat(keys, dim=2), torch.cat(values, dim=2)
            del keys, values

            def attend(query: torch.Tensor) -> torch.Tensor:
                return F.scaled_dot_product_attention(query, key, value, scale=attention.scale)

        else:
            stored = [(k.to(self.store_device), v.to(self.store_device)) for k, v in key_value_bands()]
            stored_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in stored)
            self.usage.add(stored_bytes)

            def attend(query: torch.Tensor) -> torch.Tensor:
                return _attend_in_key_chunks(query, stored, attention.scale)

        out = self._new_store(item.target)
        statistics = _Statistics(chain.shape(item.target), batch, self.device)
        for start in range(0, height, chunks.query_rows):
            stop = min(height, start + chunks.query_rows)
            query = split_heads(attention, attention.to_q(tokens(start, stop)))
            attended = output_projection(attention, attend(query).to(self.dtype))
            attended = attended.transpose(1, 2).reshape(batch, channels, stop - start, width)
            result = (attended + source.read(start, stop, self.device)) / attention.rescale_output_factor
            if item.release:
                source.release(stop)
            statistics.add(result)
            out.append(result)
        self.stores[item.target] = out
        self.statistics[item.target] = statistics
        if not (is_linear(attention) or chunks.kv_on_device):
            self.usage.add(-stored_bytes)  # the keys and values are dropped with this pass

    def _linear_reader(
        self, attention: nn.Module, bands: Iterator[tuple[torch.Tensor, torch.Tensor]], total: int
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        state = key_mean = torch.zeros((), dtype=torch.float64, device=self.device)
        for key, value in bands:
            # Bands' states sum to the whole image's; summed in float64 so the band count does not matter.
            part_state, part_mean = linear_attention_state(key, value, total_tokens=total)
            state, key_mean = state + part_state.double(), key_mean + part_mean.double()
        state, key_mean = state.float(), key_mean.float()
        eps = attention.processor.eps
        return lambda query: linear_attention_from_state(query, state, key_mean, eps)

    # ------------------------------------------------------------------ modules
    def _module(self, unit: Unit, encode: bool) -> Any:
        """The VAE's module for ``unit``, checked against what the tiler computes."""
        part = "encoder" if encode else "decoder"
        try:
            module = self.vae.get_submodule(unit.path)
        except AttributeError as error:
            raise UnsupportedVAE(f"exact tiling does not support this VAE: no {unit.path}") from error
        if unit.kind == "attention":
            try:
                check_vae_attention(module)
            except ValueError as error:
                raise UnsupportedVAE(f"exact tiling does not support this VAE: {error}") from error
            _check(module.heads == unit.heads, "attention heads")
            return module
        if unit.kind == "resnet":
            _check(module.upsample is None and module.downsample is None, "resnet with resampling")
            _check(module.time_emb_proj is None and module.time_embedding_norm in ("default", "group"),
                   "resnet time embedding")  # fmt: skip
            _check(isinstance(module.nonlinearity, nn.SiLU), "resnet activation")
            _check(
                isinstance(module.norm1, nn.GroupNorm) and isinstance(module.norm2, nn.GroupNorm),
                "resnet norm",
            )
            shortcut = module.conv_shortcut
            _check((shortcut is not None) == unit.shortcut, "resnet shortcut")
            _check(shortcut is None or shortcut.kernel_size == (1, 1), "resnet shortcut")
            for conv, channels in ((module.conv1, unit.in_channels), (module.conv2, unit.out_channels)):
                _check_conv(conv, channels, unit.out_channels, 3, (1, 1), (1, 1))
            return module
        conv = module
        if unit.resample == "up":
            _check(module.use_conv and not module.use_conv_transpose and module.interpolate, "upsampler")
            conv = module.conv
            _check_conv(conv, unit.in_channels, unit.out_channels, 3, (1, 1), (1, 1))
        elif unit.resample == "down":
            _check(module.use_conv and module.padding == 0, "downsampler padding")
            conv = module.conv
            _check_conv(conv, unit.in_channels, unit.out_channels, 3, (2, 2), (0, 0))
        else:
            pad = unit.kernel // 2
            _check_conv(conv, unit.in_channels, unit.out_channels, unit.kernel, (1, 1), (pad, pad))
        norm = None
        if unit.norm_path is not None:
            _check(isinstance(self.vae.get_submodule(f"{part}.conv_act"), nn.SiLU), f"{part} activation")
            norm = self.vae.get_submodule(unit.norm_path)
            _check(isinstance(norm, nn.GroupNorm), f"{part} output norm")
        return conv, norm


def _check_conv(
    conv: nn.Module, in_channels: int, out_channels: int, kernel: int, stride: tuple, padding: tuple
) -> None:
    _check(isinstance(conv, nn.Conv2d), "conv")
    _check(
        conv.in_channels == in_channels and conv.out_channels == out_channels and conv.kernel_size == (kernel, kernel)
        and conv.stride == stride and conv.padding == padding and conv.dilation == (1, 1) and conv.groups == 1,
        f"conv {in_channels}->{out_channels}",
    )  # fmt: skip


def _attend_in_key_chunks(
    query: torch.Tensor, keys_values: Sequence[tuple[torch.Tensor, torch.Tensor]], scale: float
) -> torch.Tensor:
    """Softmax attention of ``query`` over keys/values given in chunks: a running max and sum (float32)."""
    query = query.float() * scale
    running_max = total = accumulated = None
    for key, value in keys_values:
        key, value = key.to(query.device).float(), value.to(query.device).float()
        scores = query @ key.transpose(-1, -2)
        chunk_max = scores.amax(dim=-1, keepdim=True)
        new_max = chunk_max if running_max is None else torch.maximum(running_max, chunk_max)
        weights = torch.exp(scores - new_max)
        del scores
        if running_max is None:
            total, accumulated = weights.sum(dim=-1, keepdim=True), weights @ value
        else:
            correction = torch.exp(running_max - new_max)
            total = total * correction + weights.sum(dim=-1, keepdim=True)
            accumulated = accumulated * correction + weights @ value
        running_max = new_max
    return accumulated / total


# ------------------------------------------------------------------------------------------- public API
def tiled_decode(vae: nn.Module, latents: torch.Tensor, **options: Any) -> torch.Tensor:
    """``vae.decode(latents).sample`` computed pass by pass, exactly (see :class:`ExactTiler`)."""
    return ExactTiler(vae, **options).decode(latents)


def tiled_encode_moments(vae: nn.Module, images: torch.Tensor, **options: Any) -> torch.Tensor:
    """The moments ``vae._encode(images)`` returns, computed pass by pass, exactly."""
    return ExactTiler(vae, **options).encode_moments(images)


def estimate_band_rows(band_bytes: int, channels: int, width: int) -> int:
    """Rows of a ``channels`` x ``width`` layer that fit ``band_bytes`` at about six float32 copies.

    A rough single-layer rule; :func:`plan_vae` sizes each pass's chunks from its actual layers.
    """
    return max(1, band_bytes // (channels * width * 4 * 6))


__all__ = [
    "DEFAULT_BAND_BYTES",
    "DEFAULT_STORE_BLOCK_BYTES",
    "STORE_POINTS",
    "Chain",
    "ExactTiler",
    "Pass",
    "Plan",
    "Point",
    "StoreBudgetError",
    "StoreUsage",
    "UnsupportedVAE",
    "Unit",
    "VAECost",
    "attention_flops",
    "estimate_band_rows",
    "plan_vae",
    "tiled_decode",
    "tiled_encode_moments",
    "tiled_vae_cost",
    "vae_units",
    "working_bytes",
]
