"""The exact tiled VAE nodes on a ComfyUI VAE: equal to ComfyUI's untiled decode and encode, within the
budget, and clear errors for budgets below the smallest workable store and latents of the wrong shape."""

from __future__ import annotations

import pytest
import torch
from tiny_nodes import tiny_models

HEIGHT, WIDTH = 256, 192  # 32 x 24 latents: with band_mb=1 every pass streams many row chunks


@pytest.fixture(scope="module")
def vae():
    return tiny_models.comfy_vae(tiny_models.diffusers_vae())


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """A smooth test picture (B, H, W, C) in [0, 1], as ComfyUI passes images."""
    y, x = torch.meshgrid(torch.linspace(0, 1, HEIGHT), torch.linspace(0, 1, WIDTH), indexing="ij")
    return torch.stack([x, y, 0.5 + 0.4 * torch.sin(6 * x + 4 * y)], dim=-1)[None]


@pytest.fixture(scope="module")
def latents(vae, image) -> torch.Tensor:
    with torch.inference_mode():
        pixels = (image.movedim(-1, 1) * 2 - 1).contiguous()  # a channels-last input costs 3.5e-4 here
        moments = vae.first_stage_model.quant_conv(vae.first_stage_model.encoder(pixels))
    return moments[:, :4].clone()


def test_decode_equals_the_untiled_decode(pack, vae, latents):
    with torch.inference_mode():
        expected = vae.decode(latents)
        (ours,) = pack.nodes.LinFusionVAEDecode().decode({"samples": latents}, vae, band_mb=1)
        (comfy_tiled,) = pack.nodes.LinFusionVAEDecode().decode({"samples": latents}, vae, band_mb=1,
                                                                 vae_attention="exact", store_on="cpu")  # fmt: skip
        theirs = vae.decode_tiled(latents)  # ComfyUI's VAEDecodeTiled at its defaults
    assert ours.shape == expected.shape == (1, HEIGHT, WIDTH, 3)
    model = pack.vae_convert.diffusers_vae(vae)
    with torch.inference_mode():
        untiled = vae.process_output(model.decode(latents).sample.float()).movedim(1, -1)
    # No seams anywhere: every pixel equals the untiled decode up to float summation order. ComfyUI's and
    # diffusers' untiled decodes of the same weights differ by about 1e-4 themselves (measured 1.1e-4).
    assert (ours - untiled).abs().max() < 1e-4
    assert (ours - expected).abs().max() < 2 * (untiled - expected).abs().max() + 1e-5
    assert torch.equal(comfy_tiled, ours)  # the store's place changes nothing
    # ComfyUI's own tiling normalises each tile on its own: far from the untiled decode.
    assert (theirs - expected).abs().mean() > 1000 * (ours - expected).abs().mean()


def test_encode_equals_the_untiled_encoder_mean(pack, vae, image, latents):
    with torch.inference_mode():
        (result,) = pack.nodes.LinFusionVAEEncode().encode(image, vae, band_mb=1)
    model = pack.vae_convert.diffusers_vae(vae)
    with torch.inference_mode():
        untiled = model.encode((image.movedim(-1, 1) * 2 - 1).contiguous()).latent_dist.mean
    ours = result["samples"]
    assert ours.shape == latents.shape
    assert (ours - untiled).abs().max() < 1e-4 * untiled.abs().max()
    assert (ours - latents).abs().max() < 2 * (untiled - latents).abs().max() + 1e-5


def test_decode_stays_within_its_store_budget(pack, vae, latents):
    """The node runs linfusion's ExactTiler with the budget: the same plan, the store within the limit."""
    from linfusion.tiled_vae import ExactTiler

    model = pack.vae_convert.diffusers_vae(vae)
    unlimited = ExactTiler(model, band_bytes=2**20)
    with torch.inference_mode():
        unlimited.decode(latents)
    budget_mb = max(unlimited.pass_store_peaks) // 2**20 // 2  # half what storing everything holds
    limited = ExactTiler(model, band_bytes=2**20, store_limit_bytes=budget_mb * 2**20)
    with torch.inference_mode():
        direct = limited.decode(latents)
        (ours,) = pack.nodes.LinFusionVAEDecode().decode({"samples": latents}, vae, store_limit_mb=budget_mb,
                                                         band_mb=1)  # fmt: skip
    assert max(limited.pass_store_peaks) <= budget_mb * 2**20 < max(unlimited.pass_store_peaks)
    assert torch.equal(ours, vae.process_output(direct.float()).movedim(1, -1))


def test_a_budget_below_the_smallest_store_names_the_smallest(pack, vae):
    """Refused when planned, before anything runs (a 1024 x 768 decode needs more than 1 MiB of store)."""
    from linfusion.tiled_vae import StoreBudgetError, tiled_decode

    latents = torch.zeros(1, 4, 96, 128)
    model = pack.vae_convert.diffusers_vae(vae)
    with pytest.raises(StoreBudgetError) as budget:
        tiled_decode(model, latents, band_bytes=2**20, store_limit_bytes=2**20)
    smallest_mb = -(-budget.value.minimum // 2**20)
    assert smallest_mb > 1
    with pytest.raises(
        ValueError, match=f"smallest store that works at this size: {smallest_mb} MiB"
    ) as error:
        pack.nodes.LinFusionVAEDecode().decode({"samples": latents}, vae, store_limit_mb=1, band_mb=1)
    assert "\n" not in str(error.value)
    plan = pack.nodes.plan_report
    report, smallest = plan(1024, 768, "decode", "float32", 1, 1, "exact", "vae device", 0, vae)
    assert smallest == smallest_mb and report.startswith("does not fit")
    report, _ = plan(1024, 768, "decode", "float32", smallest_mb, 1, "exact", "vae device", 0, vae)
    assert report.startswith("fits")


def test_latents_of_the_wrong_channel_count_are_refused(pack, vae):
    with pytest.raises(ValueError, match=r"latents of 4 channels .* shape \(1, 16, 8, 8\)"):
        pack.nodes.LinFusionVAEDecode().decode({"samples": torch.zeros(1, 16, 8, 8)}, vae)
    with pytest.raises(ValueError, match="images of 3 channels"):
        pack.nodes.LinFusionVAEEncode().encode(torch.zeros(1, 64, 64, 1), vae)


def test_linear_vae_attention_is_exact_tiling_of_the_linear_kernel(pack, vae, latents):
    """vae_attention='linear' swaps the mid-block kernel only for this decode: the VAE is left as it was."""
    from linfusion.patches.vae_attention import apply_vae_attention

    model = pack.vae_convert.diffusers_vae(vae)
    with torch.inference_mode():
        (linear,) = pack.nodes.LinFusionVAEDecode().decode({"samples": latents}, vae, band_mb=1,
                                                           vae_attention="linear")  # fmt: skip
        with apply_vae_attention(model, "linear"):
            expected = vae.process_output(model.decode(latents).sample.float()).movedim(1, -1)
        (exact,) = pack.nodes.LinFusionVAEDecode().decode({"samples": latents}, vae, band_mb=1)
    assert (linear - expected).abs().max() < 1e-4
    assert (linear - exact).abs().max() > 1e-4  # the kernel did change


def test_plan_reports_the_full_size_vae(pack):
    from linfusion.registry import SD_VAE_CONFIG
    from linfusion.tiled_vae import tiled_vae_cost

    report, smallest = pack.nodes.plan_report(16384, 16384, "decode", "float16", 0, 256, "linear", "cpu", 0)
    cost = tiled_vae_cost(SD_VAE_CONFIG, 16384, 16384, dtype=torch.float16, band_bytes=2**28,
                          device_store_bytes=0, attention="linear")  # fmt: skip
    assert report.startswith("fits: decode 16384x16384")
    assert f"VAE device peak {cost.device_peak / 2**20:,.0f} MiB" in report
    assert f"host {cost.host_peak / 2**20:,.0f} MiB" in report
    assert 0 < smallest < cost.store_peak / 2**20


def test_vaes_that_are_not_kl_vaes_are_refused(pack):
    """TAESD (ComfyUI's preview VAE) has no LDM encoder/decoder: a clear refusal, not a wrong image."""
    import comfy.sd
    import comfy.taesd.taesd

    with torch.inference_mode():
        taesd = comfy.sd.VAE(sd=comfy.taesd.taesd.TAESD().state_dict())
    with pytest.raises(ValueError, match="take Stable Diffusion's KL VAEs"):
        pack.nodes.LinFusionVAEDecode().decode({"samples": torch.zeros(1, 4, 8, 8)}, taesd)
