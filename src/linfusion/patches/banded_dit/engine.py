"""The banded DiT's passes: conditioning, the patch embedding of a band, a block over a band, the output of a
band, and :class:`DiTRun`, which runs (or, for the cost model, traces) every pass over the bands and keeps
the accounts (FLOPs, device bytes, host traffic)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...banding import BandPasses, BandStore, BandTrace, Body, Fetch, StoredActivation, band_ranges
from ..banded_unet.attention import LinearAttentionPasses, transformer_rows
from ..banded_unet.schedule import linear_flops
from ..banded_unet.transformer import as_tokens


@dataclass(frozen=True)
class DiTConditioning:
    """What every band of one call shares, built exactly as ``PixArtTransformer2DModel.forward`` builds it."""

    timestep: torch.Tensor  # AdaLN-single's (B, 6 C) modulation input of every block
    embedded_timestep: torch.Tensor  # (B, C), for the output modulation
    context: torch.Tensor  # the projected caption tokens (B, T, C)
    mask: torch.Tensor | None  # the caption mask as an additive bias (B, 1, T)
    cross_attention: dict[str, Any]  # keyword arguments of every attn2 call


def dit_conditioning(
    transformer: nn.Module,
    sample: torch.Tensor,
    captions: torch.Tensor,
    timestep: Any,
    options: dict[str, Any],
) -> DiTConditioning:
    """The timestep modulation, projected captions and caption mask of one call."""
    added = options.get("added_cond_kwargs")
    if transformer.use_additional_conditions and added is None:
        raise ValueError(
            "`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`."
        )
    mask = options.get("encoder_attention_mask")
    if mask is not None and mask.ndim == 2:
        mask = ((1 - mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    batch = sample.shape[0]
    modulation, embedded = transformer.adaln_single(
        timestep, added, batch_size=batch, hidden_dtype=sample.dtype
    )
    if transformer.caption_projection is not None:
        captions = transformer.caption_projection(captions).view(batch, -1, transformer.inner_dim)
    return DiTConditioning(
        modulation, embedded, captions, mask, dict(options.get("cross_attention_kwargs") or {})
    )


def position_rows(embed: nn.Module, height: int, width: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of the sine-cosine position table of a ``height`` x ``width`` token grid, as
    ``PatchEmbed`` computes the whole table (its own buffer at its native size)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

    if embed.height == height and embed.width == width:
        return embed.pos_embed[:, start * width : stop * width]
    device = embed.proj.weight.device
    scale = embed.interpolation_scale
    grid_h = torch.arange(height, device=device, dtype=torch.float32) / (height / embed.base_size) / scale
    grid_w = torch.arange(width, device=device, dtype=torch.float32) / (width / embed.base_size) / scale
    grid = torch.stack(torch.meshgrid(grid_w, grid_h[start:stop], indexing="xy"), dim=0)
    table = get_2d_sincos_pos_embed_from_grid(embed.pos_embed.shape[-1], grid, output_type="pt")
    return table.float().unsqueeze(0)


def embed_band(embed: nn.Module, latent_rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A band of latent rows -> its tokens (B, rows * W, C), position rows added, as ``PatchEmbed`` does."""
    tokens = embed.proj(latent_rows).flatten(2).transpose(1, 2)
    return (tokens + positions).to(tokens.dtype)


def block_modulation(block: nn.Module, timestep: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """AdaLN-single's six (B, 1, C) shifts, scales and gates of one block."""
    return tuple((block.scale_shift_table[None] + timestep.reshape(timestep.shape[0], 6, -1)).chunk(6, dim=1))


def attention_input(
    block: nn.Module, tokens: torch.Tensor, modulation: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """The modulated ``norm1`` of a band: what the block's ``attn1`` sees."""
    shift, scale = modulation[0], modulation[1]
    return block.norm1(tokens) * (1 + scale) + shift


def block_band(
    block: nn.Module,
    tokens: torch.Tensor,
    attention: LinearAttentionPasses,
    modulation: tuple[torch.Tensor, ...],
    conditioning: DiTConditioning,
) -> torch.Tensor:
    """One block on a band of tokens, its self-attention read from the whole sequence's state."""
    _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
    tokens = gate_msa * attention.read(attention_input(block, tokens, modulation)) + tokens
    if block.attn2 is not None:
        cross = block.attn2(
            tokens,
            encoder_hidden_states=conditioning.context,
            attention_mask=conditioning.mask,
            **conditioning.cross_attention,
        )
        tokens = cross + tokens
    normed = block.norm2(tokens) * (1 + scale_mlp) + shift_mlp
    return gate_mlp * block.ff(normed) + tokens


def output_band(
    transformer: nn.Module, tokens: torch.Tensor, embedded: torch.Tensor, width: int
) -> torch.Tensor:
    """The output norm, modulation, ``proj_out`` and unpatchify of a band: (B, out, rows * p, W * p)."""
    table = transformer.scale_shift_table
    shift, scale = (table[None] + embedded[:, None].to(table.device)).chunk(2, dim=1)
    hidden = transformer.norm_out(tokens)
    hidden = transformer.proj_out(hidden * (1 + scale.to(hidden.device)) + shift.to(hidden.device))
    patch, channels = transformer.config.patch_size, transformer.out_channels
    rows = tokens.shape[1] // width
    hidden = hidden.reshape(-1, rows, width, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", hidden).reshape(-1, channels, rows * patch, width * patch)


class DiTRun(BandPasses):
    """One banded call's passes over the bands, its store and transfers, and their accounts.

    ``dry`` (the cost model) walks the same passes on ``meta`` but traces one band of each size and kind of
    pass: its working bytes on top of what the store holds on the device give the device peak, its FLOPs
    and copies times the bands of that size give the call's.
    """

    def __init__(self, store: BandStore, dry: bool = False) -> None:
        super().__init__(store, dry)
        self.repeated_flops = 0  # projections the bands repeat (the captions' keys and values)
        self._traces: dict[Any, BandTrace] = {}

    def measured(self, work: Callable[[], Any]) -> Any:
        """``work()``; a dry run counts its FLOPs."""
        if not self.dry:
            return work()
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            result = work()
        self.flops += int(counter.get_total_flops())
        return result

    def passes_over(self, bands: list[tuple[int, int]], fetch: Fetch, body: Body, kind: Any) -> None:
        """``body(start, stop, inputs)`` for every band, ``inputs`` from ``fetch(start, stop)`` (dry: traced
        once per band size and ``kind``, FLOPs counted on the attention's math path).

        With a separate store the next band's fetch is issued before the current band's body runs (on CUDA
        the copy then overlaps the compute); a dry trace keeps a second fetch alive to stand for it.
        """
        self.passes += 1
        if not self.dry:
            self.run_bands(bands, fetch, body)
            self.transfers.finish()
            return
        ahead = self.fetches_ahead(bands)
        for rows, count in Counter(stop - start for start, stop in bands).items():
            if (kind, rows) not in self._traces:
                start, stop = next(b for b in bands if b[1] - b[0] == rows)
                self._traces[(kind, rows)] = self.trace_band(
                    fetch, body, start, stop, ahead, count_flops=True
                )
            self.account(self._traces[(kind, rows)], count)


def run_blocks(
    run: DiTRun, transformer: nn.Module, sample: torch.Tensor, conditioning: DiTConditioning, band_bytes: int
) -> torch.Tensor:
    """Every pass of one call over bands of token rows (see the package docstring); returns the output."""
    batch, _, latent_height, latent_width = sample.shape
    patch = transformer.config.patch_size
    height, width = latent_height // patch, latent_width // patch
    blocks = list(transformer.transformer_blocks)
    store, dtype = run.store, sample.dtype
    rows = min(
        transformer_rows(band_bytes, batch, width, block, conditioning.context.shape[1], dtype.itemsize)
        for block in blocks
    )
    bands = band_ranges(height, rows)
    stream = store.allocate((batch, transformer.inner_dim, height, width), dtype, parked=False, tokens=True)
    out = store.hold(sample.new_empty(batch, transformer.out_channels, latent_height, latent_width))
    modulations = [block_modulation(block, conditioning.timestep) for block in blocks]
    if blocks[0].attn2 is not None:  # the captions' keys and values, projected again for every band
        text = batch * conditioning.context.shape[1]
        per_band = linear_flops(blocks[0].attn2.to_k, text) + linear_flops(blocks[0].attn2.to_v, text)
        run.repeated_flops = (len(bands) - 1) * len(blocks) * per_band
    attention = LinearAttentionPasses(blocks[0].attn1, height * width, batch, store)

    def nothing(start: int, stop: int) -> None:
        return None  # the latent is the caller's, on the device

    def embed(start: int, stop: int, fetched: None) -> None:
        positions = position_rows(transformer.pos_embed, height, width, start, stop)
        tokens = embed_band(transformer.pos_embed, sample[:, :, start * patch : stop * patch], positions)
        put(run, stream, start, stop, tokens, width)
        attention.add(attention_input(blocks[0], tokens, modulations[0]))

    run.passes_over(bands, nothing, embed, "embed")

    def fetch(start: int, stop: int) -> Any:
        return run.transfers.fetch(stream, start, stop)

    for index, block in enumerate(blocks):
        attention.finish()
        last = index + 1 == len(blocks)
        following = (
            None if last else LinearAttentionPasses(blocks[index + 1].attn1, height * width, batch, store)
        )

        def body(start: int, stop: int, fetched: torch.Tensor, block: nn.Module = block, index: int = index,
                 following: Any = following, attention: LinearAttentionPasses = attention) -> None:  # fmt: skip
            tokens = as_tokens(fetched)
            tokens = block_band(block, tokens, attention, modulations[index], conditioning)
            if following is None:
                out[:, :, start * patch : stop * patch] = output_band(
                    transformer, tokens, conditioning.embedded_timestep, width
                )
                return
            put(run, stream, start, stop, tokens, width)
            following.add(attention_input(blocks[index + 1], tokens, modulations[index + 1]))

        run.passes_over(bands, fetch, body, "last" if last else "block")
        attention.release()
        attention = following  # type: ignore[assignment]
    store.release(stream)
    store.release(out)
    return out


def put(
    run: DiTRun, stream: StoredActivation, start: int, stop: int, tokens: torch.Tensor, width: int
) -> None:
    """Write a band of tokens (B, rows * W, C) into rows ``[start, stop)`` of the stream."""
    batch, count, channels = tokens.shape
    rows = tokens.reshape(batch, count // width, width, channels).permute(0, 3, 1, 2)
    run.transfers.put(stream, start, stop, rows)


__all__ = [
    "DiTConditioning",
    "DiTRun",
    "attention_input",
    "block_band",
    "block_modulation",
    "dit_conditioning",
    "embed_band",
    "output_band",
    "position_rows",
    "put",
    "run_blocks",
]
