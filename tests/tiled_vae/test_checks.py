"""What the exact tiler supports: other layers are refused, never approximated."""

from __future__ import annotations

import pytest
import torch

from linfusion.testing import tiny_vae
from linfusion.tiled_vae import UnsupportedVAE, tiled_decode


def test_unknown_layers_are_refused_not_approximated() -> None:
    vae = tiny_vae()
    vae.decoder.conv_act = torch.nn.ReLU()
    with pytest.raises(UnsupportedVAE, match="decoder activation"):
        tiled_decode(vae, torch.randn(1, 4, 4, 4))
