"""The banded DiT: equal to the unbanded LinFusion PixArt transformer, reversible, refused without LinFusion;
its cost model against counted FLOPs and traced bytes, bounded at 16K."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from linfusion import LinFusion
from linfusion.patches.banded_dit import UnsupportedDiT, apply_banded_dit, banded_dit_cost
from linfusion.patches.banded_dit.cost import meta_dit_inputs
from linfusion.patches.savers import apply_memory_savers
from linfusion.registry import build_meta_transformer
from linfusion.testing import PIXART_FAMILIES, tiny_pipeline, tiny_transformer
from linfusion.tracing import traced_peak

TOLERANCE = 1e-5  # fp32; measured differences are ~5e-7 (float summation order only)
ONE_ROW = 1  # a band budget so small that every band is one row of tokens
GIB = 2**30


def make_transformer(family: str, linfusion: bool = True) -> torch.nn.Module:
    transformer = tiny_transformer(family)
    if linfusion:
        LinFusion.from_transformer(transformer, init="random").mount(transformer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the initial values (zero-initialised modulation tables and outputs)
        for parameter in transformer.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return transformer


def call_inputs(transformer: torch.nn.Module, batch: int, height: int, width: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, 7)
    mask[0, 4:] = 0  # a padded caption: the mask must reach every band's cross-attention
    added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
    if transformer.use_additional_conditions:
        added = {
            "resolution": torch.tensor([[height * 8.0, width * 8.0]] * batch),
            "aspect_ratio": torch.tensor([[height / width]] * batch),
        }
    return {
        "hidden_states": torch.randn(batch, 4, height, width, generator=generator),
        "encoder_hidden_states": torch.randn(
            batch, 7, transformer.config.caption_channels, generator=generator
        ),
        "timestep": torch.tensor([10, 700][:batch]),
        "encoder_attention_mask": mask,
        "added_cond_kwargs": added,
        "return_dict": False,
    }


@torch.no_grad()
def forward(transformer: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The latent positionally, as the PixArt pipelines pass it (sequential CFG splits it as ``sample``)."""
    inputs = dict(inputs)
    return transformer(inputs.pop("hidden_states"), **inputs)[0]


@pytest.mark.parametrize("family", PIXART_FAMILIES)
@pytest.mark.parametrize("size", [(16, 16), (24, 16), (10, 14)], ids=["native", "taller", "odd-bands"])
@pytest.mark.parametrize("store", [None, "cpu"], ids=["device-store", "host-store"])
def test_banded_equals_unbanded(family: str, size: tuple[int, int], store: str | None) -> None:
    """One row of tokens per band (position rows computed per band off the native grid), both CFG branches."""
    transformer = make_transformer(family)
    inputs = call_inputs(transformer, 2, *size)
    plain = forward(transformer, inputs)
    with apply_banded_dit(transformer, band_bytes=ONE_ROW, store_device=store):
        banded = forward(transformer, inputs)
    assert banded.shape == plain.shape
    assert (banded - plain).abs().max().item() < TOLERANCE * plain.abs().max().item()
    assert not torch.equal(banded, forward(make_transformer(family), call_inputs(transformer, 2, 16, 16)))


def test_one_band_and_many_bands_agree() -> None:
    transformer = make_transformer("pixart-sigma")
    inputs = call_inputs(transformer, 1, 24, 16)
    results = []
    for band_bytes in (ONE_ROW, 10**12):
        with apply_banded_dit(transformer, band_bytes=band_bytes):
            results.append(forward(transformer, inputs))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-5)


def test_remove_restores_bit_for_bit() -> None:
    transformer = make_transformer("pixart-alpha")
    inputs = call_inputs(transformer, 2, 16, 16)
    before = forward(transformer, inputs)
    forward_before = transformer.forward
    patch = apply_banded_dit(transformer, band_bytes=ONE_ROW, store_device="cpu")
    forward(transformer, inputs)
    patch.remove()
    assert transformer.forward == forward_before
    assert torch.equal(forward(transformer, inputs), before)


def test_composes_with_sequential_cfg_and_feed_forward_chunking() -> None:
    transformer = make_transformer("pixart-sigma")
    inputs = call_inputs(transformer, 2, 16, 16)
    plain = forward(transformer, inputs)
    banded = apply_banded_dit(transformer, band_bytes=ONE_ROW)
    with banded, apply_memory_savers(transformer, feed_forward_chunk=5, sequential_cfg=True):
        saved = forward(transformer, inputs)
    assert (saved - plain).abs().max().item() < TOLERANCE * plain.abs().max().item()
    assert torch.equal(forward(transformer, inputs), plain)


def test_pipeline_image_unchanged() -> None:
    pipe = tiny_pipeline("pixart-sigma")
    LinFusion.construct_for(pipe, load_pretrained=False)
    common = {"prompt": "a red square", "num_inference_steps": 2, "height": 128, "width": 96,
              "use_resolution_binning": False, "clean_caption": False, "output_type": "np",
              "max_sequence_length": 16}  # fmt: skip
    plain = pipe(generator=torch.Generator().manual_seed(0), **common).images
    with apply_banded_dit(pipe.transformer, band_bytes=ONE_ROW):
        banded = pipe(generator=torch.Generator().manual_seed(0), **common).images
    assert abs(banded - plain).max() < 1e-4


def test_softmax_attention_is_refused_with_the_reason() -> None:
    transformer = make_transformer("pixart-sigma", linfusion=False)
    forward_before = transformer.forward
    with pytest.raises(UnsupportedDiT, match="softmax self-attention cannot be banded.*Mount LinFusion"):
        apply_banded_dit(transformer)
    assert transformer.forward == forward_before


def test_other_models_and_gradients_are_refused() -> None:
    from linfusion.testing import tiny_unet

    with pytest.raises(UnsupportedDiT, match="UNet2DConditionModel"):
        apply_banded_dit(tiny_unet("sd15"))
    transformer = make_transformer("pixart-sigma")
    inputs = call_inputs(transformer, 1, 16, 16)
    with apply_banded_dit(transformer), pytest.raises(UnsupportedDiT, match="gradients"):
        transformer(**inputs)
    inputs = call_inputs(transformer, 1, 15, 16)
    with apply_banded_dit(transformer), torch.no_grad(), pytest.raises(UnsupportedDiT, match="patch size"):
        transformer(**inputs)


def meta_transformer(family: str, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    transformer = torch.nn.Module.to(build_meta_transformer(family), dtype)
    LinFusion.from_transformer(transformer).mount(transformer)
    return transformer


@pytest.mark.parametrize("family", PIXART_FAMILIES)
def test_cost_flops_match_the_counted_unbanded_flops(family: str) -> None:
    """The cost model's unbanded FLOPs equal torch's count of the plain LinFusion forward (full size, on meta)
    plus the linear attention's products, which the op's fused kernels hide from the counter; the banded
    ones add only the captions' per-band projections."""
    transformer = meta_transformer(family)
    cost = banded_dit_cost(
        transformer, 1024, 512, batch=2, band_bytes=64 * 2**20, store_on_host=False, caption_tokens=120
    )
    inputs = meta_dit_inputs(transformer, 2, 64, 128, torch.float16, 120)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        transformer(**inputs)
    heads, head_dim, tokens = 16, 72, 32 * 64
    linear_attention = (
        28 * 2 * 2 * heads * tokens * head_dim * (2 * head_dim + 1)
    )  # phi(K)^T V, then q's read
    assert cost.plain_flops == pytest.approx(counter.get_total_flops() + linear_attention, rel=1e-4)
    assert 1.0 < cost.flop_overhead < 1.05
    assert cost.passes == 28 + 1


def test_cost_bytes_bound_the_traced_unbanded_call() -> None:
    """At 2048 px the unbanded call holds whole activations; the banded one a band (32 MiB planned) plus the
    residual stream, which the host store takes off the device."""
    transformer = meta_transformer("pixart-sigma")
    inputs = meta_dit_inputs(transformer, 1, 256, 256, torch.float16, 300)
    unbanded = traced_peak(lambda: transformer(**inputs))
    stream = 128 * 128 * 1152 * 2
    band = 32 * 2**20
    on_device = banded_dit_cost(transformer, 2048, 2048, batch=1, band_bytes=band, store_on_host=False)
    on_host = banded_dit_cost(transformer, 2048, 2048, batch=1, band_bytes=band, store_on_host=True)
    assert stream < on_device.device_peak < unbanded / 3
    assert on_host.host_peak == stream and on_host.device_peak < on_device.device_peak - stream / 2
    assert on_host.moved_bytes == pytest.approx(2 * 29 * stream, rel=0.05)  # every pass reads, most write


def test_16k_band_is_bounded() -> None:
    """16384x8192 px, 524,288 tokens: the stream (1.2 GB in fp16) on the host, the device holds one band."""
    transformer = meta_transformer("pixart-sigma")
    cost = banded_dit_cost(transformer, 16384, 8192, batch=1, store_on_host=True)
    assert cost.host_peak == 524_288 * 1152 * 2
    assert cost.device_peak < 0.5 * GIB
    on_device = banded_dit_cost(transformer, 16384, 8192, batch=1, store_on_host=False)
    assert cost.host_peak < on_device.device_peak < 2 * GIB
