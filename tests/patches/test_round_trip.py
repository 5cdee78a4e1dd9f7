"""Every in-place change, alone and in nested pairs, is undone bit for bit by its handle's ``remove()``.

The check is on what a user sees: a seeded pipeline call (text-to-image with classifier-free guidance,
through the UNet and the VAE) gives the very same array after ``remove()`` as before the patch, and the
models hold the very same submodules and tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from linfusion import LinFusion
from linfusion.patches import Patch
from linfusion.patches.dilation import apply_dilated_branch, apply_dilation
from linfusion.patches.savers import apply_feed_forward_chunking, apply_sequential_cfg, apply_skip_offload
from linfusion.patches.stage import Savers, apply_savers
from linfusion.patches.tiling import apply_exact_tiling
from linfusion.patches.vae_attention import apply_vae_attention
from linfusion.testing import tiny_pipeline
from support import run

PATCHES: dict[str, Callable[[Any], Patch]] = {
    "linfusion": lambda pipe: LinFusion.from_unet(pipe.unet, init="random").mount(pipe),
    "feed_forward_chunks": lambda pipe: apply_feed_forward_chunking(pipe.unet, 7),
    "sequential_cfg": lambda pipe: apply_sequential_cfg(pipe.unet),
    "skip_offload": lambda pipe: apply_skip_offload(pipe.unet, "cpu"),
    "exact_tiling": lambda pipe: apply_exact_tiling(pipe.vae, band_bytes=50_000),
    "linear_vae_attention": lambda pipe: apply_vae_attention(pipe.vae, "linear"),
    "dilation": lambda pipe: apply_dilation(pipe.unet, 2),
    "dilated_branch": lambda pipe: apply_dilated_branch(pipe.unet, 2),
    "model_offload": lambda pipe: apply_savers(pipe, Savers(model_offload=True)),
}


def image(pipe: Any) -> np.ndarray:
    return run(pipe, steps=1, guidance_scale=5.0)


def state(pipe: Any) -> dict[str, Any]:
    """Every submodule (by identity) and every tensor (by value) of the pipeline's models."""
    found: dict[str, Any] = {}
    for name in ("unet", "vae"):
        model = getattr(pipe, name)
        found.update({f"{name}.{path}": module for path, module in model.named_modules()})
        found.update({f"{name}:{key}": value.clone() for key, value in model.state_dict().items()})
        found[f"{name} instance attributes"] = sorted(model.__dict__)
    return found


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        elif isinstance(value, torch.nn.Module):
            assert after[key] is value, key
        else:
            assert after[key] == value, key


@pytest.fixture(scope="module")
def pipe() -> Any:
    return tiny_pipeline("sd15")


@pytest.mark.parametrize("name", list(PATCHES))
def test_each_patch_changes_the_run_then_leaves_no_trace(pipe: Any, name: str) -> None:
    before, models = image(pipe), state(pipe)
    with PATCHES[name](pipe) as patch:
        assert patch.changed
        patched = image(pipe)
    assert np.array_equal(image(pipe), before)
    assert_same_state(models, state(pipe))
    if name in ("linfusion", "linear_vae_attention", "dilation", "dilated_branch"):
        assert not np.array_equal(patched, before)  # a change of the computation, visibly


@pytest.mark.slow
@pytest.mark.parametrize(("outer", "inner"), list(itertools.permutations(PATCHES, 2)))
def test_nested_pairs_undo_in_reverse_order(pipe: Any, outer: str, inner: str) -> None:
    before, models = image(pipe), state(pipe)
    first = PATCHES[outer](pipe)
    only_outer = image(pipe)
    if (outer, inner) == ("model_offload", "sequential_cfg"):  # refused: offload re-wraps after each call
        with pytest.raises(ValueError, match="CFG branches one at a time first, then offload"):
            PATCHES[inner](pipe)
        first.remove()
        assert np.array_equal(image(pipe), before)
        return
    second = PATCHES[inner](pipe)
    image(pipe)
    second.remove()
    assert np.array_equal(image(pipe), only_outer)
    first.remove()
    assert np.array_equal(image(pipe), before)
    assert_same_state(models, state(pipe))


@pytest.mark.parametrize("name", list(PATCHES))
def test_applying_the_same_patch_again_is_undone_exactly(pipe: Any, name: str) -> None:
    """The same saver already on (with its own settings) before a second application: removing the
    second gives back the first's output, removing the first gives back the original."""
    before = image(pipe)
    first = PATCHES[name](pipe)
    with_first = image(pipe)
    second = PATCHES[name](pipe)
    image(pipe)
    second.remove()
    assert np.array_equal(image(pipe), with_first)
    first.remove()
    assert np.array_equal(image(pipe), before)


def test_a_second_feed_forward_chunking_replaces_the_first_chunk_size(pipe: Any) -> None:
    feed_forward = next(m for m in pipe.unet.modules() if type(m).__name__ == "FeedForward")
    seen: list[int] = []
    probe = feed_forward.net[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        with apply_feed_forward_chunking(pipe.unet, 100), apply_feed_forward_chunking(pipe.unet, 30):
            run(pipe, steps=1)
    finally:
        probe.remove()
    assert max(seen) <= 30  # chunks of the inner application, not chunks of chunks of 100
