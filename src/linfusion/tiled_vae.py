"""Exact tiled VAE encode and decode: any size, bounded working memory, no seams.

diffusers' own ``enable_tiling`` runs every tile through the network on its own, so each tile
normalizes with its own GroupNorm statistics (visible seams, colour shifts). Here the network runs
layer by layer over row bands instead:

- every convolution reads its band plus the halo rows it needs, so it computes exactly what the full
  convolution computes;
- every activation that feeds a GroupNorm carries per-channel sums and sums of squares (float64),
  accumulated band by band while it is produced, so each GroupNorm normalizes with whole-image statistics;
- the mid-block self-attention is global: keys and values of all tokens are built band by band and the
  queries attend to them in chunks (exact softmax attention, memory O(chunk x tokens), time quadratic);
  with the linear VAE attention (:mod:`linfusion.vae_attention`) one pass sums the key/value state of
  every band and a second reads it (time and memory linear in the tokens).

The result equals the untiled VAE up to float summation order. Working memory on the compute device is
one band of one layer; full activations live in a *store* that may sit on another device
(``store_device="cpu"`` keeps only bands on the GPU). Peak store memory is about two activations of the
largest layer (input and output of the layer being computed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .ops.reference import linear_attention_from_state, linear_attention_state
from .vae_attention import check_vae_attention, is_linear, output_projection, split_heads

DEFAULT_BAND_BYTES = 256 * 2**20
TokenRows = Callable[[int, int], torch.Tensor]  # rows [start, stop) -> (B, rows * W, C) tokens
KeyValueBands = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (B, heads, tokens, d) keys and values per band


@dataclass
class Activation:
    """A full activation (B, C, H, W) in the store, with per-channel sums for the next GroupNorm."""

    tensor: torch.Tensor
    sums: torch.Tensor  # (B, C) float64
    squares: torch.Tensor  # (B, C) float64

    @property
    def count(self) -> int:
        return self.tensor.shape[-2] * self.tensor.shape[-1]


class UnsupportedVAE(NotImplementedError):
    """The VAE has a layer the exact tiler does not know; use the untiled VAE or diffusers' tiling."""


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise UnsupportedVAE(f"exact tiling does not support this VAE: {what}")


class ExactTiler:
    """Runs an ``AutoencoderKL``'s encoder or decoder band by band (see the module docstring)."""

    def __init__(
        self,
        vae: nn.Module,
        band_bytes: int = DEFAULT_BAND_BYTES,
        store_device: torch.device | str | None = None,
    ):
        self.vae = vae
        parameter = next(vae.parameters())
        self.device = parameter.device
        self.dtype = parameter.dtype
        self.store_device = torch.device(store_device) if store_device is not None else self.device
        self.band_bytes = band_bytes

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        latents = latents.to(self.store_device, self.dtype)
        x = self._wrap(latents)
        if getattr(vae, "post_quant_conv", None) is not None:
            x = self._conv(x, vae.post_quant_conv)
        decoder = vae.decoder
        x = self._conv(x, decoder.conv_in)
        x = self._mid_block(x, decoder.mid_block)
        for block in decoder.up_blocks:
            for resnet in block.resnets:
                x = self._resnet(x, resnet)
            if block.upsamplers:
                upsampler = block.upsamplers[0]
                _check(
                    upsampler.use_conv and not upsampler.use_conv_transpose and upsampler.interpolate,
                    "upsampler",
                )
                x = self._conv(x, upsampler.conv, mode="up")
        _check(isinstance(decoder.conv_act, nn.SiLU), "decoder activation")
        return self._conv(x, decoder.conv_out, norm=decoder.conv_norm_out).tensor

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """What ``AutoencoderKL._encode`` returns: the latent distribution's mean and log-variance."""
        vae = self.vae
        encoder = vae.encoder
        x = self._conv(self._wrap(images.to(self.store_device, self.dtype)), encoder.conv_in)
        for block in encoder.down_blocks:
            for resnet in block.resnets:
                x = self._resnet(x, resnet)
            if block.downsamplers:
                downsampler = block.downsamplers[0]
                _check(downsampler.use_conv and downsampler.padding == 0, "downsampler padding")
                x = self._conv(x, downsampler.conv, mode="down")
        x = self._mid_block(x, encoder.mid_block)
        _check(isinstance(encoder.conv_act, nn.SiLU), "encoder activation")
        x = self._conv(x, encoder.conv_out, norm=encoder.conv_norm_out)
        if getattr(vae, "quant_conv", None) is not None:
            x = self._conv(x, vae.quant_conv)
        return x.tensor

    # ------------------------------------------------------------------ statistics
    def _wrap(self, tensor: torch.Tensor) -> Activation:
        stats = tensor.to(self.device, torch.float64)
        return Activation(tensor, stats.sum(dim=(2, 3)), stats.square().sum(dim=(2, 3)))

    def _affine(self, x: Activation, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-(sample, channel) scale and shift that apply ``norm`` with whole-image statistics."""
        batch, channels = x.sums.shape
        groups = norm.num_groups
        count = x.count * (channels // groups)
        group_sums = x.sums.view(batch, groups, -1).sum(-1)
        group_squares = x.squares.view(batch, groups, -1).sum(-1)
        mean = group_sums / count
        variance = (group_squares / count - mean.square()).clamp_min(0.0)
        inverse = (variance + norm.eps).rsqrt()
        mean = mean.repeat_interleave(channels // groups, dim=1)
        inverse = inverse.repeat_interleave(channels // groups, dim=1)
        weight = norm.weight.double() if norm.affine else torch.ones_like(mean)
        bias = norm.bias.double() if norm.affine else torch.zeros_like(mean)
        scale = inverse * weight
        shift = bias - mean * scale
        return scale.float()[:, :, None, None], shift.float()[:, :, None, None]

    def _rows_per_band(self, channels: int, width: int) -> int:
        return estimate_band_rows(self.band_bytes, channels, width)

    # ------------------------------------------------------------------ layers
    def _conv(
        self,
        x: Activation,
        conv: nn.Conv2d,
        norm: nn.GroupNorm | None = None,
        mode: str = "same",
        residual: Activation | None = None,
        shortcut: nn.Module | None = None,
        output_scale: float = 1.0,
    ) -> Activation:
        """``conv(silu(norm(x)))`` (or ``conv(x)`` without a norm), optionally ``(shortcut(residual) + .) / s``.

        ``mode``: "same" (stride 1, padding k // 2), "up" (nearest x2, then the conv), "down" (diffusers'
        VAE downsampler: zero-pad right and bottom by one, then stride 2, no padding).
        """
        kernel = conv.kernel_size[0]
        _check(
            conv.kernel_size[0] == conv.kernel_size[1] and conv.dilation == (1, 1) and conv.groups == 1,
            "conv",
        )
        tensor = x.tensor
        batch, _, height, width = tensor.shape
        if mode == "same":
            _check(conv.stride == (1, 1) and conv.padding == (kernel // 2, kernel // 2), "conv padding")
            out_height, out_width, halo = height, width, kernel // 2
        elif mode == "up":
            _check(conv.stride == (1, 1) and conv.padding == (kernel // 2, kernel // 2), "upsampler conv")
            out_height, out_width, halo = 2 * height, 2 * width, kernel // 2
        else:
            _check(conv.stride == (2, 2) and conv.padding == (0, 0) and kernel == 3, "downsampler conv")
            out_height, out_width, halo = height // 2, width // 2, 0
        scale_shift = self._affine(x, norm) if norm is not None else None
        out = torch.empty(
            batch, conv.out_channels, out_height, out_width, dtype=self.dtype, device=self.store_device
        )
        sums = torch.zeros(batch, conv.out_channels, dtype=torch.float64, device=self.device)
        squares = torch.zeros_like(sums)
        rows = self._rows_per_band(max(conv.in_channels, conv.out_channels), out_width)

        def prepare(band: torch.Tensor) -> torch.Tensor:
            band = band.to(self.device)
            if scale_shift is not None:
                band = F.silu(band.float() * scale_shift[0] + scale_shift[1]).to(self.dtype)
            return band

        for start in range(0, out_height, rows):
            stop = min(out_height, start + rows)
            if mode == "same":
                first, last = max(0, start - halo), min(height, stop + halo)
                band = prepare(tensor[:, :, first:last])
                band = F.pad(band, (0, 0, first - (start - halo), (stop + halo) - last))
                result = F.conv2d(band, conv.weight, conv.bias, padding=(0, halo))
            elif mode == "up":
                want_first, want_last = max(0, start - halo), min(out_height, stop + halo)
                source_first, source_last = want_first // 2, (want_last - 1) // 2 + 1
                band = prepare(tensor[:, :, source_first:source_last])
                band = F.interpolate(band, scale_factor=2.0, mode="nearest")
                band = band[:, :, want_first - 2 * source_first : want_last - 2 * source_first]
                band = F.pad(band, (0, 0, want_first - (start - halo), (stop + halo) - want_last))
                result = F.conv2d(band, conv.weight, conv.bias, padding=(0, halo))
            else:
                first, last = 2 * start, min(height, 2 * stop + 1)
                band = prepare(tensor[:, :, first:last])
                band = F.pad(band, (0, 1, 0, (2 * stop + 1) - last))
                result = F.conv2d(band, conv.weight, conv.bias, stride=2)
            if residual is not None:
                skip = residual.tensor[:, :, start:stop].to(self.device)
                if shortcut is not None:
                    skip = shortcut(skip)
                result = (skip + result) / output_scale
            statistics = result.double()
            sums += statistics.sum(dim=(2, 3))
            squares += statistics.square().sum(dim=(2, 3))
            out[:, :, start:stop] = result.to(self.store_device, self.dtype)
        return Activation(out, sums, squares)

    def _resnet(self, x: Activation, block: nn.Module) -> Activation:
        _check(block.upsample is None and block.downsample is None, "resnet with resampling")
        _check(
            block.time_emb_proj is None and block.time_embedding_norm in ("default", "group"),
            "resnet time embedding",
        )
        _check(isinstance(block.nonlinearity, nn.SiLU), "resnet activation")
        _check(isinstance(block.norm1, nn.GroupNorm) and isinstance(block.norm2, nn.GroupNorm), "resnet norm")
        hidden = self._conv(x, block.conv1, norm=block.norm1)
        shortcut = block.conv_shortcut if block.conv_shortcut is not None else None
        if shortcut is not None:
            _check(shortcut.kernel_size == (1, 1), "resnet shortcut")
        return self._conv(
            hidden,
            block.conv2,
            norm=block.norm2,
            residual=x,
            shortcut=shortcut,
            output_scale=block.output_scale_factor,
        )

    def _mid_block(self, x: Activation, block: nn.Module) -> Activation:
        x = self._resnet(x, block.resnets[0])
        for attention, resnet in zip(block.attentions, block.resnets[1:]):
            if attention is not None:
                x = self._attention(x, attention)
            x = self._resnet(x, resnet)
        return x

    def _attention(self, x: Activation, attention: nn.Module) -> Activation:
        """The mid-block self-attention over all tokens, band by band.

        Softmax (the VAE's own): keys/values of all tokens are built by band, queries attend in chunks.
        Linear (:class:`~linfusion.vae_attention.LinearVAEAttnProcessor`): a first pass sums the key/value
        state of every band, a second reads it per band; memory and time linear in the tokens.
        """
        try:
            check_vae_attention(attention)
        except ValueError as error:
            raise UnsupportedVAE(f"exact tiling does not support this VAE: {error}") from error
        tensor = x.tensor
        batch, channels, height, width = tensor.shape
        scale, shift = self._affine(x, attention.group_norm)
        rows = self._rows_per_band(channels, width)

        def tokens(start: int, stop: int) -> torch.Tensor:
            band = tensor[:, :, start:stop].to(self.device)
            band = (band.float() * scale + shift).to(self.dtype)
            return band.flatten(2).transpose(1, 2)  # (B, rows * W, C)

        bands = (  # (key, value) heads of each row band, built lazily
            (split_heads(attention, attention.to_k(band)), split_heads(attention, attention.to_v(band)))
            for band in (tokens(start, min(height, start + rows)) for start in range(0, height, rows))
        )
        if is_linear(attention):
            attend, query_rows = self._linear_reader(attention, tokens, bands, height * width), rows
        else:
            attend, query_rows = self._softmax_reader(attention, tokens, bands, width, rows)

        out = torch.empty_like(tensor)
        sums = torch.zeros(batch, channels, dtype=torch.float64, device=self.device)
        squares = torch.zeros_like(sums)
        for start in range(0, height, query_rows):
            stop = min(height, start + query_rows)
            attended = attend(start, stop)  # (B, rows * W, C) after to_out
            attended = attended.transpose(1, 2).reshape(batch, channels, stop - start, width)
            result = (attended + tensor[:, :, start:stop].to(self.device)) / attention.rescale_output_factor
            statistics = result.double()
            sums += statistics.sum(dim=(2, 3))
            squares += statistics.square().sum(dim=(2, 3))
            out[:, :, start:stop] = result.to(self.store_device, self.dtype)
        return Activation(out, sums, squares)

    def _softmax_reader(
        self, attention: nn.Module, tokens: TokenRows, bands: KeyValueBands, width: int, rows: int
    ) -> tuple[TokenRows, int]:
        keys, values = zip(*bands)
        key, value = torch.cat(keys, dim=2), torch.cat(values, dim=2)
        del keys, values
        batch, heads, total = key.shape[:3]
        # Query rows per chunk so that the (chunk x tokens) score matrix stays within the band budget.
        query_rows = max(1, min(rows, self.band_bytes // max(1, batch * total * width * heads * 4)))

        def attend(start: int, stop: int) -> torch.Tensor:
            query = split_heads(attention, attention.to_q(tokens(start, stop)))
            attended = F.scaled_dot_product_attention(query, key, value, scale=attention.scale)
            return output_projection(attention, attended)

        return attend, query_rows

    def _linear_reader(
        self, attention: nn.Module, tokens: TokenRows, bands: KeyValueBands, total: int
    ) -> TokenRows:
        state = key_mean = torch.zeros((), dtype=torch.float64, device=self.device)
        for key, value in bands:
            # Bands' states sum to the whole image's; summed in float64 so the band count does not matter.
            part_state, part_mean = linear_attention_state(key, value, total_tokens=total)
            state, key_mean = state + part_state.double(), key_mean + part_mean.double()
        state, key_mean = state.float(), key_mean.float()
        eps = attention.processor.eps

        def attend(start: int, stop: int) -> torch.Tensor:
            query = split_heads(attention, attention.to_q(tokens(start, stop)))
            attended = linear_attention_from_state(query, state, key_mean, eps).to(self.dtype)
            return output_projection(attention, attended)

        return attend


def tiled_decode(vae: nn.Module, latents: torch.Tensor, **options: Any) -> torch.Tensor:
    """``vae.decode(latents).sample`` computed band by band, exactly (see :class:`ExactTiler`)."""
    return ExactTiler(vae, **options).decode(latents)


def tiled_encode_moments(vae: nn.Module, images: torch.Tensor, **options: Any) -> torch.Tensor:
    """The moments ``vae._encode(images)`` returns, computed band by band, exactly."""
    return ExactTiler(vae, **options).encode_moments(images)


def estimate_band_rows(band_bytes: int, channels: int, width: int) -> int:
    """Rows per band for a layer of ``channels`` x ``width`` within ``band_bytes`` of working memory.

    A band costs about six fp32 copies: the rows read, their normalized copy, the halo-padded input,
    the conv output and its float64 statistics copy.
    """
    return max(1, band_bytes // (channels * width * 4 * 6))


__all__ = [
    "ExactTiler",
    "UnsupportedVAE",
    "estimate_band_rows",
    "tiled_decode",
    "tiled_encode_moments",
]
