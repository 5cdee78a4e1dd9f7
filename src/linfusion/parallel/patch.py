"""Reversible per-module patches that make a model compute on one horizontal stripe of its input, exactly.

Every layer of a Stable Diffusion UNet, ControlNet or VAE decoder is either local per token (linear
layers, LayerNorm, cross-attention, feed-forward, 1x1 convolutions, nearest upsampling) or needs a
small amount of information from the other stripes:

* ``Conv2d`` with a kernel taller than one row, or a stride: halo rows from the neighbouring stripes;
  zero padding only at the global top and bottom. Strided convolutions need stripes that start at
  multiples of the stride (see :mod:`linfusion.parallel.layout`).
* ``GroupNorm``: per (sample, group) count, mean and M2 of every stripe, all-gathered and merged with
  Chan's formula in fp64 (:class:`linfusion.banding.Moments`: no sum-of-squares cancellation).
* LinFusion's ``GeneralizedLinearAttention``: the per-head state phi(K)^T V / N and key mean, scaled by the
  *global* N and all-reduced in fp32 (:func:`linfusion.ops.linear_attention_state`), then applied to the
  local queries: the same formula as the single-process reference.
* diffusers softmax self-attention (a UNet ``attn1`` without LinFusion, the VAE mid-block attention):
  the keys and values of every stripe are all-gathered (exact; communication grows with the token count).
* A diffusion transformer's patch embedding (PixArt's ``PatchEmbed``): the patchifying convolution is per
  stripe (kernel = stride = patch size), but the sine-cosine position table belongs to the whole grid:
  each rank adds its own rows of the global table. Everything after it in a PixArt block is per token
  (LayerNorm, AdaLN-single modulation, cross-attention, the MLP) except ``attn1``, handled as above.

Which rows each rank holds is learned once per layer and input size with a tiny all-gather of local
sizes and cached while the caller keeps ``layout_key`` unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from ..attention import GeneralizedLinearAttention
from ..banding import Moments
from ..ops import linear_attention_from_state, linear_attention_state
from ..patches.base import Patch, set_attribute
from ..vae_attention import LinearVAEAttnProcessor
from .comm import Communicator
from .layout import StripeLayoutError


class UnsupportedLayerError(NotImplementedError):
    """A layer that spatial parallelism cannot split exactly (the message names it and says why)."""


def _softmax_attention_class() -> type | None:
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return None
    return Attention


@lru_cache(maxsize=4096)
def _conv_plan(
    sizes: tuple[int, ...], kernel: int, stride: int, padding: int, dilation: int
) -> tuple[tuple[int, int, int, int, int, int, int], ...]:
    """Per rank: (zeros_top, recv_up, trim_bottom, recv_down, zeros_bottom, send_up, send_down).

    Rank i owns output rows [start_i / stride, stop_i / stride) (the last rank: up to the global output
    height) and needs input rows [o0 * stride - padding, (o1 - 1) * stride - padding + dilation * (kernel - 1)].
    """
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    height = sum(sizes)
    out_height = (height + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    last = len(sizes) - 1
    plans = []
    for index, (start, size) in enumerate(zip(starts, sizes)):
        stop = start + size
        if start % stride:
            raise StripeLayoutError(
                f"a stripe starts at row {start}, not a multiple of a convolution's stride {stride}: "
                "stripe starts must be multiples of 2 ** (downsampling levels)"
            )
        first_out = start // stride
        end_out = out_height if index == last else stop // stride
        if end_out <= first_out:
            raise StripeLayoutError(
                f"the stripe at rows {start}..{stop} of {height} produces no output row of a stride-{stride} "
                "convolution; use fewer processes or a taller image"
            )
        low = first_out * stride - padding
        high = (end_out - 1) * stride - padding + dilation * (kernel - 1) + 1
        zeros_top = max(0, -low)
        recv_up = start - max(low, 0)
        trim = max(0, stop - high)
        recv_down = max(0, min(high, height) - stop)
        zeros_bottom = max(0, high - height)
        if index > 0 and recv_up > sizes[index - 1]:
            raise StripeLayoutError(
                f"a convolution needs {recv_up} halo rows but the stripe above has only {sizes[index - 1]}"
            )
        if index < last and recv_down > sizes[index + 1]:
            raise StripeLayoutError(
                f"a convolution needs {recv_down} halo rows but the stripe below has only {sizes[index + 1]}"
            )
        plans.append([zeros_top, recv_up, trim, recv_down, zeros_bottom, 0, 0])
    for index, plan in enumerate(plans):
        plan[5] = plans[index - 1][3] if index > 0 else 0  # rows rank i - 1 wants from below
        plan[6] = plans[index + 1][1] if index < last else 0  # rows rank i + 1 wants from above
    return tuple(tuple(plan) for plan in plans)  # type: ignore[return-value]


class SpatialParallel:
    """The patches of some models for one rank of a spatial group (see the module docstring).

    ``active`` switches the patched layers between the stripe computation and their original forward
    (the pipeline hooks switch it on only while the split model runs). ``layout_key`` names the current
    global input geometry; while it is unchanged each layer's per-rank sizes are cached.
    """

    def __init__(self, models: list[nn.Module], comm: Communicator, active: bool = True) -> None:
        self.models = models
        self.comm = comm
        self.active = active
        self.layout_key: Any = None
        self._sizes: dict[tuple[int, Any, int], list[int]] = {}
        self._changes = Patch("spatial parallelism")
        self.patched: dict[str, int] = {}

    # ------------------------------------------------------------------ bookkeeping
    def sizes(self, module: nn.Module, local: int) -> list[int]:
        """Every rank's extent of the split dimension at ``module`` (cached per layout_key)."""
        key = (id(module), self.layout_key, local)
        if self.layout_key is not None and key in self._sizes:
            return self._sizes[key]
        sizes = [row[0] for row in self.comm.all_gather_ints([local])]
        if self.layout_key is not None:
            self._sizes[key] = sizes
        return sizes

    def _set(self, module: nn.Module, name: str, value: Callable) -> None:
        self._changes.add(set_attribute(module, name, value))

    def patch(self) -> SpatialParallel:
        """Patch every layer that needs cross-stripe data; checks all layers before changing any."""
        attention_class = _softmax_attention_class()
        plan: list[tuple[str, nn.Module]] = []
        seen: set[int] = set()
        for model in self.models:
            for name, module in model.named_modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                if isinstance(module, nn.Conv2d):
                    if module.kernel_size[0] == 1 and module.stride[0] == 1 and module.padding[0] == 0:
                        continue  # per row: nothing to exchange
                    if isinstance(module.padding, str) or module.padding_mode != "zeros":
                        raise UnsupportedLayerError(
                            f"{name}: Conv2d with padding={module.padding!r}, padding_mode="
                            f"{module.padding_mode!r}; only numeric zero padding can be split into stripes"
                        )
                    plan.append(("conv", module))
                elif isinstance(module, nn.GroupNorm):
                    plan.append(("groupnorm", module))
                elif type(module).__name__ == "PatchEmbed":
                    if getattr(module, "pos_embed_max_size", None) or not getattr(module, "flatten", True):
                        raise UnsupportedLayerError(
                            f"{name}: a patch embedding with a cropped position table (SD3 style) or "
                            "without flattening; only PixArt's whole-grid sine-cosine table is split"
                        )
                    plan.append(("patch_embed", module))
                elif isinstance(module, GeneralizedLinearAttention):
                    plan.append(("linear_attention", module))
                elif isinstance(getattr(module, "processor", None), LinearVAEAttnProcessor):
                    plan.append(("linear_attention", module.processor))  # the VAE's linear kernel
                elif attention_class is not None and isinstance(module, attention_class):
                    if module.is_cross_attention:
                        continue  # keys come from the text: local per query
                    if getattr(module, "fused_projections", False):
                        raise UnsupportedLayerError(
                            f"{name}: fused q/k/v projections; call unfuse_qkv_projections() first "
                            "(the keys and values must be gathered separately)"
                        )
                    plan.append(("softmax_attention", module))
                elif (
                    type(module).__name__ == "Downsample2D"
                    and getattr(module, "padding", 1) == 0
                    and getattr(module, "use_conv", False)
                ):
                    raise UnsupportedLayerError(
                        f"{name}: Downsample2D with padding=0 pads one row at the bottom of each stripe"
                    )
        for kind, module in plan:
            getattr(self, f"_patch_{kind}")(module)
            self.patched[kind] = self.patched.get(kind, 0) + 1
        return self

    def restore(self) -> None:
        """Put every original forward back, in reverse order (:mod:`linfusion.patches` protocol)."""
        self._changes.remove()
        self._changes = Patch("spatial parallelism")
        self._sizes.clear()

    # ------------------------------------------------------------------ the layers
    def _patch_conv(self, conv: nn.Conv2d) -> None:
        original = conv.forward

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not self.active:
                return original(x, *args, **kwargs)
            dim = x.ndim - 2
            sizes = self.sizes(conv, x.shape[dim])
            plans = _conv_plan(
                tuple(sizes), conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
            )
            zeros_top, recv_up, trim, recv_down, zeros_bottom, send_up, send_down = plans[self.comm.rank]
            above, below = self.comm.exchange_rows(x, dim, send_up, send_down, recv_up, recv_down)
            pieces = []
            if zeros_top:
                pieces.append(x.new_zeros(*x.shape[:dim], zeros_top, x.shape[-1]))
            if above is not None:
                pieces.append(above)
            pieces.append(x.narrow(dim, 0, x.shape[dim] - trim) if trim else x)
            if below is not None:
                pieces.append(below)
            if zeros_bottom:
                pieces.append(x.new_zeros(*x.shape[:dim], zeros_bottom, x.shape[-1]))
            extended = torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0]
            padding = conv.padding
            conv.padding = (0, padding[1])  # rows: the halo and the zeros above are the padding now
            try:
                return original(extended, *args, **kwargs)
            finally:
                conv.padding = padding

        self._set(conv, "forward", forward)

    def _patch_groupnorm(self, norm: nn.GroupNorm) -> None:
        original = norm.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not self.active:
                return original(x)
            local = Moments.of(x.reshape(x.shape[0], norm.num_groups, -1))  # per (sample, group)
            parts = self.comm.all_gather_cat(local.stacked()[None], 0, [1] * self.comm.world, "groupnorm")
            whole = Moments.from_stacked(parts).reduce(0)
            return whole.normalizer(norm)(x).to(x.dtype)

        self._set(norm, "forward", forward)

    def _patch_linear_attention(self, layer: GeneralizedLinearAttention | LinearVAEAttnProcessor) -> None:
        original = layer.attend

        def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            if not self.active:
                return original(query, key, value)
            total = sum(self.sizes(layer, key.shape[-2]))
            state, key_mean = linear_attention_state(key, value, total_tokens=total)
            flat = torch.cat([state.reshape(-1), key_mean.reshape(-1)])
            self.comm.all_reduce_sum(flat, "linear_state")
            state = flat[: state.numel()].view_as(state)
            key_mean = flat[state.numel() :].view_as(key_mean)
            return linear_attention_from_state(query, state, key_mean, layer.eps).to(query.dtype)

        self._set(layer, "attend", attend)

    def _patch_patch_embed(self, embed: nn.Module) -> None:
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        original = embed.forward

        def forward(latent: torch.Tensor) -> torch.Tensor:
            if not self.active or embed.pos_embed is None:
                return original(latent)
            rows, columns = latent.shape[-2] // embed.patch_size, latent.shape[-1] // embed.patch_size
            sizes = self.sizes(embed, rows)
            start, total = sum(sizes[: self.comm.rank]), sum(sizes)
            tokens = embed.proj(latent).flatten(2).transpose(1, 2)  # the patched conv: this stripe's rows
            if embed.layer_norm:
                tokens = embed.norm(tokens)
            if (total, columns) == (embed.height, embed.width):
                table = embed.pos_embed  # the single-process model uses its stored table at this size
            else:
                table = get_2d_sincos_pos_embed(
                    embed_dim=embed.pos_embed.shape[-1],
                    grid_size=(total, columns),
                    base_size=embed.base_size,
                    interpolation_scale=embed.interpolation_scale,
                    device=tokens.device,
                    output_type="pt",
                )
                table = table.float().unsqueeze(0)
            table = table[:, start * columns : (start + rows) * columns]
            return (tokens + table).to(tokens.dtype)

        self._set(embed, "forward", forward)

    def _patch_softmax_attention(self, attention: nn.Module) -> None:
        for projection in (attention.to_k, attention.to_v):
            self._patch_gathered_projection(projection)

    def _patch_gathered_projection(self, projection: nn.Module) -> None:
        original = projection.forward

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = original(x, *args, **kwargs)
            if not self.active:
                return out
            if out.ndim != 3:
                raise UnsupportedLayerError(
                    f"self-attention keys of shape {tuple(out.shape)}; expected (batch, tokens, channels)"
                )
            sizes = self.sizes(projection, out.shape[1])
            return self.comm.all_gather_cat(out, 1, sizes, "kv_gather")

        self._set(projection, "forward", forward)


@contextlib.contextmanager
def spatial_parallel(*models: nn.Module, group: Any = None) -> Iterator[SpatialParallel]:
    """Run ``models`` on this rank's horizontal stripe of their input, exactly, for the duration.

    Each rank calls the models with its own rows (stripes in rank order, top to bottom; widths and batch
    equal) and gets its rows of the output. Stripe starts must be multiples of 2 ** (downsampling levels)
    (:func:`linfusion.parallel.stripe_bounds` computes valid ones). ``group`` is the ``torch.distributed``
    process group of the stripes (None: the default group). Everything is restored on exit, also after
    an exception. For whole pipelines use :func:`linfusion.parallel.parallel_pipeline`.
    """
    patches = SpatialParallel(list(models), Communicator(group)).patch()
    try:
        yield patches
    finally:
        patches.restore()
