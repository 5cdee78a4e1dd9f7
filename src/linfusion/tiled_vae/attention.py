"""The kernels of the mid-block attention pass: every query chunk attends to the keys and values of all tokens.

The attention is global, so the pass first goes over every chunk's keys and values, then over the query
chunks. Which kernel runs is decided with the pass's chunks (:func:`.chain.attention_chunks`):

- ``LINEAR`` (the linear VAE attention of :mod:`linfusion.vae_attention`): the chunks' key/value states
  sum to the whole image's (float64 across chunks); each query chunk reads that state;
- ``SOFTMAX``: the keys and values of all tokens are concatenated on the compute device; each query chunk
  runs ``scaled_dot_product_attention`` over them;
- ``SOFTMAX_KEY_CHUNKS``: the keys and values do not fit the chunk budget; they are kept in the store and
  each query chunk reads them key chunk by key chunk with a running log-sum-exp.

Each reader returns the attended values of a query chunk, (B, heads, tokens, head_dim).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import linear_attention_from_state, linear_attention_state

Reader = Callable[[torch.Tensor], torch.Tensor]


def linear_reader(
    attention: nn.Module, bands: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int, device: torch.device
) -> Reader:
    """``LINEAR``: sum the key/value state of every band of ``total`` tokens, then read it per query chunk."""
    state = key_mean = torch.zeros((), dtype=torch.float64, device=device)
    for key, value in bands:
        # Bands' states sum to the whole image's; summed in float64 so the band count does not matter.
        part_state, part_mean = linear_attention_state(key, value, total)
        state, key_mean = state + part_state.double(), key_mean + part_mean.double()
    state, key_mean = state.float(), key_mean.float()
    eps = attention.processor.eps
    return lambda query: linear_attention_from_state(query, state, key_mean, eps)


def softmax_reader(attention: nn.Module, bands: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Reader:
    """``SOFTMAX``: the bands' keys and values concatenated on the compute device."""
    keys, values = zip(*bands)
    key, value = torch.cat(keys, dim=2), torch.cat(values, dim=2)
    del keys, values
    return lambda query: F.scaled_dot_product_attention(query, key, value, scale=attention.scale)


def softmax_in_key_chunks(
    query: torch.Tensor, keys_values: Sequence[tuple[torch.Tensor, torch.Tensor]], scale: float
) -> torch.Tensor:
    """``SOFTMAX_KEY_CHUNKS``: softmax attention of ``query`` over keys/values given in chunks (wherever they
    are stored), with a running max and sum (float32)."""
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


__all__ = ["Reader", "linear_reader", "softmax_in_key_chunks", "softmax_reader"]
