"""A ``Transformer2DModel`` over row bands, in one pass per transformer block plus one.

The first pass applies its GroupNorm and ``proj_in`` and adds every band to the first block's ``attn1``
(:mod:`.attention`); pass ``i`` reads block ``i``'s self-attention with each band's queries, runs the
per-token rest of block ``i`` (LayerNorms, cross-attention to the text, feed-forward) and adds the new
tokens to block ``i + 1``'s ``attn1``; the last pass ends with ``proj_out`` and the residual. Nothing is
computed twice. Between passes the tokens live in the store as a token stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...banding import StoredActivation, band_ranges
from .attention import attend, attention_passes, projects_text_once, transformer_rows
from .schedule import BandRun, Conditioning, conv_flops, linear_flops


def transformer_pass(
    run: BandRun,
    x: StoredActivation,
    transformer: nn.Module,
    conditioning: Conditioning,
    parked: bool = False,
) -> StoredActivation:
    """A ``Transformer2DModel`` in ``len(blocks) + 1`` passes (see the module docstring)."""
    batch, channels, height, width = x.shape
    blocks = list(transformer.transformer_blocks)
    inner = blocks[0].norm1.normalized_shape[0]
    rows = min(
        transformer_rows(run.band_bytes, batch, width, b, run.context_tokens, run.dtype.itemsize)
        for b in blocks
    )
    job = TransformerJob(
        transformer,
        x,
        stream=run.new((batch, inner, height, width), parked=False, tokens=True),
        out=run.new((batch, channels, height, width), parked),
        bands=band_ranges(height, rows),
    )
    if job.linear_projection:
        run.count(linear_flops(transformer.proj_in, batch * job.tokens) * 2)
    else:
        run.count(conv_flops(transformer.proj_in, batch, height, width) * 2)
    normalize = x.moments.normalizer(transformer.norm)  # type: ignore[union-attr]
    passes = attention_passes(blocks[0].attn1, job.tokens, batch, run.store, run.dtype)

    def fetch(start: int, stop: int) -> Any:
        return [run.transfers.fetch(x, start, stop)]

    def project_in(start: int, stop: int, fetched: list[torch.Tensor]) -> None:
        band = normalize(fetched[0]).to(run.dtype)
        if job.linear_projection:
            hidden = transformer.proj_in(as_tokens(band))
        else:
            hidden = as_tokens(transformer.proj_in(band))
        run.transfers.put(job.stream, start, stop, job.as_rows(hidden))
        passes.add(blocks[0].norm1(hidden))

    run.passes_over(job.bands, fetch, project_in)
    for index, block in enumerate(blocks):
        passes.finish()
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        next_passes = None
        if following is not None:
            next_passes = attention_passes(following.attn1, job.tokens, batch, run.store, run.dtype)
        _block_pass(run, job, block, passes, following, next_passes, conditioning)
        passes.release()
        passes = next_passes
    run.store.release(job.stream)
    return job.out


def _block_pass(
    run: BandRun,
    job: TransformerJob,
    block: nn.Module,
    passes: Any,
    following: nn.Module | None,
    following_passes: Any,
    conditioning: Conditioning,
) -> None:
    """One pass of a transformer block over all bands: its per-token layers, then the following block's
    key/value state (after the last block: ``proj_out`` and the residual instead)."""
    batch, channels, _, _ = job.x.shape
    tokens = batch * job.tokens
    attn1, attn2 = block.attn1, block.attn2
    core = type(passes).core_flops(attn1, batch, job.tokens)
    run.count(linear_flops(attn1, tokens) + core + linear_flops(block.ff, tokens))
    text_keys = text_values = None
    if attn2 is not None:
        context_tokens = batch * conditioning.context.shape[1]
        per_query = linear_flops(attn2.to_q, tokens) + linear_flops(attn2.to_out, tokens)
        per_query += 4 * tokens * conditioning.context.shape[1] * attn2.to_q.out_features
        context = linear_flops(attn2.to_k, context_tokens) + linear_flops(attn2.to_v, context_tokens)
        if projects_text_once(attn2, conditioning.cross_attention):
            text_keys = run.store.hold(attn2.to_k(conditioning.context))
            text_values = run.store.hold(attn2.to_v(conditioning.context))
            run.count(per_query + context)
        else:  # the module is called per band and projects the text every time
            run.count(per_query + len(job.bands) * context, per_query + context)

    def fetch(start: int, stop: int) -> Any:
        fetched = [run.transfers.fetch(job.stream, start, stop)]
        if following is None:
            fetched.append(run.transfers.fetch(job.x, start, stop))
        return fetched

    def body(start: int, stop: int, fetched: list[torch.Tensor]) -> None:
        hidden = as_tokens(fetched[0])
        hidden = passes.read(block.norm1(hidden)) + hidden
        if text_keys is not None:
            hidden = attend(attn2, block.norm2(hidden), text_keys, text_values) + hidden
        elif attn2 is not None:
            cross = attn2(
                block.norm2(hidden),
                encoder_hidden_states=conditioning.context,
                **conditioning.cross_attention,
            )
            hidden = cross + hidden
        hidden = block.ff(block.norm3(hidden)) + hidden
        if following is not None:
            run.transfers.put(job.stream, start, stop, job.as_rows(hidden))
            following_passes.add(following.norm1(hidden))
            return
        if job.linear_projection:
            result = job.as_rows(job.transformer.proj_out(hidden))
        else:
            result = job.transformer.proj_out(job.as_rows(hidden).contiguous())
        run.write(job.out, start, stop, result + fetched[1])

    # every block but the last runs the same pass (blocks of one Transformer2DModel are built alike)
    run.passes_over(job.bands, fetch, body, alike=(id(job), "block") if following is not None else None)
    if text_keys is not None:
        run.store.release(text_keys)
        run.store.release(text_values)


def as_tokens(band: torch.Tensor) -> torch.Tensor:
    """Logical (B, C, rows, W) -> tokens (B, rows * W, C), row-major as diffusers flattens them."""
    return band.permute(0, 2, 3, 1).reshape(band.shape[0], -1, band.shape[1])


@dataclass
class TransformerJob:
    """What every pass of one ``Transformer2DModel`` shares: its input, token stream, output and bands."""

    transformer: nn.Module
    x: StoredActivation
    stream: StoredActivation  # the tokens between blocks, (B, inner, H, W) logically
    out: StoredActivation
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


__all__ = ["TransformerJob", "as_tokens", "transformer_pass"]
