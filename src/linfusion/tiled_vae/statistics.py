"""Whole-image GroupNorm statistics summed over row chunks, and the normalization that applies them.

Interface the tiler relies on (:mod:`.tiler`), kept in this one module so that another implementation
of the statistics can replace it:

- ``Statistics(batch, channels, device)``: ``add(rows)`` for every chunk of one activation (rows of shape
  (batch, channels, rows, width), in any order, each row once); then ``affine(norm)`` gives the
  per-(sample, channel) ``(scale, shift)``, float32 of shape (batch, channels, 1, 1), that apply the
  GroupNorm ``norm`` with the whole activation's statistics: ``norm(x) == x * scale + shift``.
- ``normalize(rows, affine)``: ``silu(rows * scale + shift)`` computed in float32, back in the rows' dtype
  (``affine`` None: the rows unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Statistics:
    """Per-(sample, channel) sums and sums of squares of one activation: float32 per chunk, float64 across."""

    def __init__(self, batch: int, channels: int, device: torch.device):
        self.count = 0  # pixels per channel added so far
        self.sums = torch.zeros(batch, channels, dtype=torch.float64, device=device)
        self.squares = torch.zeros_like(self.sums)

    def add(self, rows: torch.Tensor) -> None:
        """Count one chunk of rows."""
        values = rows if rows.dtype == torch.float64 else rows.float()
        self.count += rows.shape[2] * rows.shape[3]
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


def normalize(rows: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``silu(norm(rows))`` in float32, back in the rows' dtype."""
    if affine is None:
        return rows
    normalized = torch.addcmul(affine[1], rows.float(), affine[0])
    return F.silu(normalized, inplace=True).to(rows.dtype)


__all__ = ["Statistics", "normalize"]
