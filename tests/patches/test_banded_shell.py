"""The shell of the banded forwards: each family's refusal, the band size, the store and host arena kept
between calls, the refusal of gradients, the patch (refused under accelerate hooks, giving the arena back)
and the cost read from a run's accounts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from linfusion.banding import BandPasses, BandStore
from linfusion.patches.banded_dit import UnsupportedDiT
from linfusion.patches.banded_shell import (
    BandedCost,
    BandedForward,
    UnsupportedBanding,
    check_eval_mode,
    install_banded_forward,
)
from linfusion.patches.banded_unet import UnsupportedUNet


class Doubling(BandedForward):
    """A banded forward of a linear layer that doubles its input, its store on the host."""

    error = UnsupportedUNet
    label = "the layer"
    patch_name = "doubling"

    def __call__(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        def compute() -> torch.Tensor:
            with self.call_store(x.device, dry=False) as store:
                stored = store.allocate(tuple(x.shape), x.dtype, parked=True)
                BandPasses(store).transfers.put(stored, 0, x.shape[2], x)
                return 2 * stored.logical(stored.physical_rows(0, x.shape[2])).clone()

        return self.inference(x, compute, return_dict)

    def output(self, sample: torch.Tensor) -> Any:
        return {"sample": sample}


def test_each_family_refuses_with_its_own_class_and_name() -> None:
    with pytest.raises(UnsupportedUNet, match="^the banded UNet does not support the call: gradients$"):
        UnsupportedUNet.require(False, "the call", "gradients")
    with pytest.raises(UnsupportedDiT, match="^the banded DiT does not support pos_embed: a LayerNorm$"):
        UnsupportedDiT.require(False, "pos_embed", "a LayerNorm")
    UnsupportedDiT.require(True, "pos_embed", "a LayerNorm")
    assert issubclass(UnsupportedUNet, UnsupportedBanding) and issubclass(UnsupportedDiT, NotImplementedError)
    dropping = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    with pytest.raises(UnsupportedDiT, match=r"the model: active dropout \(call model.eval\(\)\)"):
        check_eval_mode(dropping, UnsupportedDiT, "the model", "model")
    check_eval_mode(dropping.eval(), UnsupportedDiT, "the model", "model")


def test_a_band_needs_a_byte() -> None:
    with pytest.raises(ValueError, match="band_bytes must be >= 1"):
        Doubling(nn.Linear(2, 2), band_bytes=0)


def test_the_host_arena_is_kept_between_calls_and_given_back_on_remove() -> None:
    layer = nn.Linear(2, 2)
    banded = Doubling(layer, store_device="cpu")
    x = torch.arange(24.0).reshape(1, 2, 3, 4)
    with install_banded_forward(banded):
        with torch.no_grad():
            out = layer.forward(x)
        assert torch.equal(out["sample"], 2 * x)
        arena = banded.host_arena
        assert arena is not None and arena.capacity >= x.numel() * 4
        assert banded.last_store_peak["host"] == x.numel() * 4
        with torch.no_grad():
            assert torch.equal(layer.forward(x, return_dict=False)[0], 2 * x)
        assert banded.host_arena is arena  # the second call reused it
    assert banded.host_arena is None
    assert "forward" not in vars(layer)


def test_gradients_are_refused_and_accelerate_hooks_too() -> None:
    layer = nn.Linear(2, 2)
    with install_banded_forward(Doubling(layer)), pytest.raises(UnsupportedUNet, match="gradients"):
        layer.forward(torch.ones(1, 2, 1, 1))
    layer._hf_hook = object()
    with pytest.raises(UnsupportedUNet, match="the layer: accelerate hooks"):
        install_banded_forward(Doubling(layer))
    assert "forward" not in vars(layer)


def test_the_cost_reads_the_accounts_of_a_run() -> None:
    run = BandPasses(BandStore(torch.device("meta"), "cpu"), dry=True)
    run.store.peak = {"device": 100, "host": 700}
    run.flops, run.passes, run.working_peak = 30, 4, 250
    run.transfers.fetched, run.transfers.written = 11, 5
    cost = BandedCost.of_run(run, plain_flops=20)
    assert cost == BandedCost(
        device_peak=250, host_peak=700, flops=30, plain_flops=20, moved_bytes=16, passes=4
    )
    assert cost.flop_overhead == 1.5
    run.working_peak = 50  # the store's own device peak is higher than any band's
    assert BandedCost.of_run(run, plain_flops=20).device_peak == 100
