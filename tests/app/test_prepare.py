"""Preparing requests: settling --vae-attention auto for the stages, and what the plan records."""

from __future__ import annotations

from pathlib import Path

from linfusion import LinFusion
from linfusion.app.loading import load
from linfusion.app.params import GenerationParams
from linfusion.app.prepare import Budgets, choose_vae_attention, prepare
from linfusion.pipelines.chain import Stage
from linfusion.testing import tiny_pipeline
from linfusion.vae_attention import vae_attention_mode

LARGE = [Stage(64, 64, None), Stage(1024, 1024, 0.3)]  # 262,144 mid-block tokens at 1024 px (2x VAE)
GIB = 2**30


def test_auto_is_exact_where_it_is_cheap_and_linear_where_measured() -> None:
    loaded = load(GenerationParams(prompt="a red circle", model="bundled"), "cpu")
    vae, device, dtype = loaded.pipe.vae, loaded.device, loaded.pipe.dtype
    small, notes = choose_vae_attention(loaded.params, vae, [Stage(64, 64, None)], device, dtype)
    assert small == "exact" and notes == []
    large, notes = choose_vae_attention(loaded.params, vae, LARGE, device, dtype)
    assert large == "linear" and "measured on this VAE" in notes[0]
    try:
        params = loaded.params.replace(width=1024, height=1024, mode="sdedit", steps=2)
        run = prepare(params, loaded.pipe, Budgets(64 * GIB), patch=loaded.patch)
        assert run.vae_attention == "linear" and vae_attention_mode(loaded.pipe.vae) == "linear"
        assert "VAE attention: linear" in run.params.to_text()  # the PNG records the kernel used
    finally:
        loaded.patch.remove()
    assert vae_attention_mode(loaded.pipe.vae) == "exact"  # removing the job's patch undoes the choice


def test_auto_on_an_unmeasured_vae_stays_exact_and_warns_with_a_prediction(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    pipe = tiny_pipeline("sd15")
    pipe.save_pretrained(folder)
    LinFusion.from_unet(pipe.unet).save_pretrained(folder / "linfusion")
    loaded = load(GenerationParams(prompt="a red circle", model=str(folder)), "cpu")
    try:
        chosen, notes = choose_vae_attention(loaded.params, loaded.pipe.vae, LARGE, loaded.device, loaded.pipe.dtype)
    finally:
        loaded.patch.remove()
    assert chosen == "exact"
    warning = " ".join(notes)
    assert (
        "262,144 tokens" in warning and "predicted about" in warning and "--vae-attention linear" in warning
    )
