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


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda vae: setattr(vae.decoder.conv_in, "padding_mode", "reflect"), "padding"),
        (lambda vae: setattr(vae.decoder.mid_block.resnets[0].conv1, "dilation", (2, 2)), "dilation"),
        (lambda vae: setattr(vae.decoder.up_blocks[0].upsamplers[0].conv, "stride", (2, 2)), "stride"),
    ],
)
def test_convolutions_outside_the_row_rules_are_refused(change, message: str) -> None:
    """Convolutions are checked with the row rules' own check: a padding mode, dilation or stride that
    the band convolution does not compute is refused before anything runs."""
    vae = tiny_vae()
    change(vae)
    with pytest.raises(UnsupportedVAE, match=message):
        tiled_decode(vae, torch.randn(1, 4, 4, 4))
