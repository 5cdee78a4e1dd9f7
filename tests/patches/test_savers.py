"""Memory savers change nothing in the result (fp32, <= 1e-5) and leave no trace when turned off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linfusion import LinFusion
from linfusion.patches.savers import (
    apply_feed_forward_chunking,
    apply_memory_savers,
    apply_sequential_cfg,
)
from linfusion.testing import tiny_pipeline
from support import run

SAVERS = {
    "feed_forward_chunk": {"feed_forward_chunk": 7},  # 7 does not divide the 256 or 64 tokens
    "sequential_cfg": {"sequential_cfg": True},
    "skip_offload": {"skip_offload": "cpu"},
    "all": {"feed_forward_chunk": 5, "sequential_cfg": True, "skip_offload": "cpu"},
}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("saver", list(SAVERS))
def test_savers_equal_the_plain_path(family: str, saver: str) -> None:
    pipe = tiny_pipeline(family)
    LinFusion.construct_for(pipe, load_pretrained=False, init="teacher")
    expected = run(pipe, guidance_scale=5.0)
    calls = []
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    with apply_memory_savers(pipe.unet, **SAVERS[saver]):
        saved = run(pipe, guidance_scale=5.0)
    hook.remove()
    assert np.abs(saved - expected).max() <= 1e-5
    if "sequential_cfg" in SAVERS[saver]:
        assert set(calls) == {1}  # the network only ever saw one CFG branch at a time
    assert "forward" not in pipe.unet.__dict__
    assert not pipe.unet._forward_hooks and not any(b._forward_pre_hooks for b in pipe.unet.up_blocks)
    assert np.array_equal(run(pipe, guidance_scale=5.0), expected)


def test_feed_forward_chunking_chunks_and_unpatches() -> None:
    pipe = tiny_pipeline("sd15")
    feed_forward = next(m for m in pipe.unet.modules() if type(m).__name__ == "FeedForward")
    seen = []
    handle = feed_forward.net[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    with apply_feed_forward_chunking(pipe.unet, chunk_tokens=100):
        run(pipe, steps=1)
    handle.remove()
    assert max(seen) <= 100 and 56 in seen  # 256 tokens -> 100 + 100 + 56
    with pytest.raises(ValueError, match="chunk_tokens"):
        apply_feed_forward_chunking(pipe.unet, chunk_tokens=0)


def test_sequential_cfg_passes_odd_batches_through() -> None:
    unet = tiny_pipeline("sd15").unet
    sample, context = torch.randn(3, 4, 8, 8), torch.randn(3, 7, 32)
    with torch.no_grad():
        expected = unet(sample, 5, encoder_hidden_states=context).sample
        with apply_sequential_cfg(unet):
            actual = unet(sample, 5, encoder_hidden_states=context).sample
    assert torch.equal(actual, expected)


def test_turning_sequential_cfg_off_restores_the_forward_it_wrapped() -> None:
    """When the UNet's forward was already an instance attribute (another patch), it comes back, not the class's."""
    pipe = tiny_pipeline("sd15")
    unet = pipe.unet
    calls = []

    def patched(*args, **kwargs):
        calls.append(args[0].shape[0])
        return type(unet).forward(unet, *args, **kwargs)

    unet.forward = patched
    with torch.no_grad(), apply_sequential_cfg(unet):
        unet(torch.randn(2, 4, 8, 8), 10, encoder_hidden_states=torch.randn(2, 7, 32))
    assert calls == [1, 1]  # the wrapped forward ran once per CFG branch
    assert unet.__dict__["forward"] is patched
