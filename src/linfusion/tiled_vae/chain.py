"""The chain model: an ``AutoencoderKL`` encoder or decoder as a chain of units, and what streaming it costs.

The chain is made of *units* (a convolution, a ResNet block, the mid-block attention) joined at *points*:
the activations between units, plus the output of the first convolution inside each ResNet block (the
input of its second GroupNorm). For one input size, :class:`Chain` knows every point's shape, bytes and the
FLOPs between any two points; :func:`working_bytes` is the device memory of a pass streaming row chunks
between two points, :func:`attention_chunks` how the mid-block attention pass is chunked. All analytic:
nothing here touches a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .checks import check

_FP32 = 4


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
    check(all(kind == expected for kind in block_types), f"block types {block_types}")
    check(len(block_types) == len(channels), "one block per block_out_channels entry")
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
        check(Point(0) not in targets, "a GroupNorm on the input")
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
def rows_at(chain: Chain, source: Point, point: Point, rows: int) -> int:
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
        in_rows, out_rows = rows_at(chain, source, point, rows), rows_at(chain, source, following, rows)
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


def pass_rows(chain: Chain, source: Point, target: Point, band_bytes: int) -> int:
    """The most source rows per chunk whose working memory stays within ``band_bytes`` (at least 1)."""
    height = chain.shape(source).height
    one, two = working_bytes(chain, source, target, 1), working_bytes(chain, source, target, 2)
    slope = max(1, two - one)
    rows = max(1, min(height, (band_bytes - one) // slope + 1))
    while rows > 1 and working_bytes(chain, source, target, rows) > band_bytes:
        rows -= 1
    return rows


# The mid-block attention pass's kernels (the choice is made by attention_chunks):
LINEAR = "linear"  # the linear VAE attention: one pass sums every chunk's key/value state, a second reads it
SOFTMAX = "softmax"  # keys and values of all tokens on the compute device; exact softmax per query chunk
SOFTMAX_KEY_CHUNKS = "softmax-key-chunks"  # keys and values in the store, read chunk by chunk (running LSE)


@dataclass(frozen=True)
class AttentionChunks:
    """How the attention pass runs: its kernel, token rows per key/value chunk and per query chunk."""

    kernel: str  # LINEAR, SOFTMAX or SOFTMAX_KEY_CHUNKS
    rows: int
    query_rows: int
    kv_bytes: int  # keys and values of all tokens (0 with LINEAR)
    working_bytes: int

    @property
    def stored_kv_bytes(self) -> int:
        """What the keys and values add to the store while the pass runs."""
        return self.kv_bytes if self.kernel == SOFTMAX_KEY_CHUNKS else 0


def attention_chunks(chain: Chain, unit_index: int, band_bytes: int) -> AttentionChunks:
    """The kernel and chunks of the attention pass at ``unit_index``: the linear attention when the chain's
    is linear; else softmax with the keys and values on the compute device when they take at most half the
    chunk budget, or with them in the store, each query chunk reading them key chunk by key chunk (scores:
    3 float32 copies)."""
    unit = chain.units[unit_index]
    channels, height, width = chain.cut_shapes[unit_index]
    batch = chain.batch
    token_row = batch * width * channels * _FP32  # one row of tokens in float32
    if chain.attention == "linear":
        kernel, kv_bytes = LINEAR, 0
    else:
        kv_bytes = 2 * batch * height * width * channels * chain.element_size
        kernel = SOFTMAX if kv_bytes <= band_bytes // 2 else SOFTMAX_KEY_CHUNKS
    kv_on_device = kv_bytes if kernel == SOFTMAX else 0
    available = band_bytes - kv_on_device
    rows = max(1, min(height, available // (8 * token_row)))
    query_rows = rows
    work = kv_on_device
    if kernel == SOFTMAX_KEY_CHUNKS:
        scores_row = 3 * _FP32 * batch * unit.heads * width * width  # scores of one query row x one key row
        rows = max(1, min(rows, math.isqrt(max(1, band_bytes // 2 // scores_row))))
        query_rows = max(1, min(height, available // (8 * token_row), band_bytes // 2 // (scores_row * rows)))
        work += scores_row * rows * query_rows
    work += 8 * token_row * max(rows, query_rows)
    return AttentionChunks(kernel, rows, query_rows, kv_bytes, work)


__all__ = [
    "LINEAR",
    "SOFTMAX",
    "SOFTMAX_KEY_CHUNKS",
    "AttentionChunks",
    "Chain",
    "Point",
    "Shape",
    "Unit",
    "attention_chunks",
    "attention_flops",
    "pass_rows",
    "rows_at",
    "vae_units",
    "working_bytes",
]
