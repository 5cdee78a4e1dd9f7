"""Whole-image GroupNorm statistics summed over row chunks equal torch's GroupNorm of the whole tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linfusion.tiled_vae.statistics import Statistics, normalize


@pytest.mark.parametrize("affine", [True, False])
def test_chunked_statistics_apply_the_group_norm_of_the_whole_tensor(affine: bool) -> None:
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    rows = torch.randn(2, 16, 13, 7) * 3 + 1.5
    statistics = Statistics(2, 16, torch.device("cpu"))
    for start, stop in ((0, 1), (1, 6), (6, 13)):  # uneven chunks
        statistics.add(rows[:, :, start:stop])
    assert statistics.count == 13 * 7
    scale, shift = statistics.affine(norm)
    with torch.no_grad():
        expected = norm(rows)
    assert (rows * scale + shift - expected).abs().max().item() <= 1e-5
    assert (normalize(rows, (scale, shift)) - F.silu(expected)).abs().max().item() <= 1e-5


def test_normalize_computes_in_float32_and_keeps_the_dtype() -> None:
    rows = torch.randn(1, 4, 3, 5).half()
    scale, shift = torch.full((1, 4, 1, 1), 2.0), torch.full((1, 4, 1, 1), -0.5)
    out = normalize(rows, (scale, shift))
    assert out.dtype == torch.float16
    assert torch.equal(out, F.silu(rows.float() * 2.0 - 0.5).half())
    assert normalize(rows, None) is rows
