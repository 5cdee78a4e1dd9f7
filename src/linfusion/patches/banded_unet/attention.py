"""A transformer block's self-attention (``attn1``) over row bands, and the cross-attention to the text.

``attn1`` attends over all tokens of the image, so it runs as two passes: every band adds what its keys
and values contribute (:meth:`add`), then every band's queries read the whole (:meth:`read`). LinFusion's
linear attention sums a small key/value state (float64 across bands); a diffusers softmax ``attn1`` keeps
the keys and values of all tokens on the device (exact, quadratic in time: for tests and small sizes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...attention import GeneralizedLinearAttention
from ...banding import BandStore
from ...ops import linear_attention_from_state, linear_attention_state

# Working elements per token of one transformer band, in multiples of the block width, besides the
# feed-forward's widest layer (counted twice: its output and the gated product): the residual stream,
# the normalized copy, the attention's queries and output, the next block's keys and values.
_TOKEN_WIDTHS = 6


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


class LinearAttentionPasses:
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
        key = split_heads(layer.to_k(normed + layer.to_k_(normed)), layer.heads)
        value = split_heads(layer.to_v(normed), layer.heads)
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
        query = split_heads(layer.to_q(normed + layer.to_q_(normed)), layer.heads)
        attended = linear_attention_from_state(query, self.state, self.key_mean, layer.eps).to(normed.dtype)
        return layer.to_out[1](layer.to_out[0](merge_heads(attended)))

    @staticmethod
    def core_flops(layer: GeneralizedLinearAttention, batch: int, tokens: int) -> int:
        """phi(K)^T V, then phi(q) against the state and the key mean."""
        head_dim = layer.head_dim
        return 2 * batch * layer.heads * tokens * head_dim * (2 * head_dim + 1)


class SoftmaxAttentionPasses:
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
        return attend(self.attention, normed, self.keys, self.values)

    def release(self) -> None:
        self.store.release(self.keys)
        self.store.release(self.values)

    @staticmethod
    def core_flops(attention: nn.Module, batch: int, tokens: int) -> int:
        return 4 * batch * tokens * tokens * attention.to_q.out_features


def attend(
    attention: nn.Module, normed: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """What ``AttnProcessor2_0`` computes for queries from ``normed`` against keys and values already projected."""
    query = split_heads(attention.to_q(normed), attention.heads)
    key, value = split_heads(keys, attention.heads), split_heads(values, attention.heads)
    attended = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    attended = merge_heads(attended).to(query.dtype)
    return attention.to_out[1](attention.to_out[0](attended)) / attention.rescale_output_factor


def projects_text_once(attention: nn.Module, cross_attention: dict[str, Any]) -> bool:
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


def attention_passes(
    attention: nn.Module, tokens: int, batch: int, store: BandStore, dtype: torch.dtype
) -> LinearAttentionPasses | SoftmaxAttentionPasses:
    """The band passes of a transformer block's ``attn1``: LinFusion's linear attention or softmax."""
    if isinstance(attention, GeneralizedLinearAttention):
        return LinearAttentionPasses(attention, tokens, batch, store)
    return SoftmaxAttentionPasses(attention, tokens, batch, store, dtype)


def transformer_rows(
    band_bytes: int, batch: int, width: int, block: nn.Module, context_tokens: int, itemsize: int
) -> int:
    """Rows per band of a transformer pass: the token buffers in the UNet's dtype, the fp32 attention scores."""
    linears = [m for m in block.ff.modules() if isinstance(m, nn.Linear)]
    inner = block.norm1.normalized_shape[0]
    widest = max([inner] + [m.out_features for m in linears])
    heads = block.attn2.heads if block.attn2 is not None else 0
    per_token = batch * (itemsize * (_TOKEN_WIDTHS * inner + 2 * widest) + 4 * 2 * heads * context_tokens)
    return max(1, band_bytes // (per_token * width))


__all__ = [
    "LinearAttentionPasses",
    "SoftmaxAttentionPasses",
    "attend",
    "attention_passes",
    "merge_heads",
    "projects_text_once",
    "split_heads",
    "transformer_rows",
]
