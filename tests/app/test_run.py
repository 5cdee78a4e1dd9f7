"""Running requests: settling --vae-attention auto for the stages, and what it records."""

from __future__ import annotations

from pathlib import Path

import pytest

from linfusion import LinFusion
from linfusion.app import run as app_run
from linfusion.app.loading import load
from linfusion.app.params import GenerationParams
from linfusion.app.run import KEPT_MEMORY_FACTOR, choose_vae_attention, returns_freed_memory
from linfusion.pipelines.chain import Stage
from linfusion.testing import tiny_pipeline
from linfusion.vae_attention import vae_attention_mode

LARGE = [Stage(64, 64, None), Stage(1024, 1024, 0.3)]  # 262,144 mid-block tokens at 1024 px (2x VAE)


def test_auto_is_exact_where_it_is_cheap_and_linear_where_measured(capsys: pytest.CaptureFixture) -> None:
    loaded = load(GenerationParams(prompt="a red circle", model="bundled"), "cpu")
    try:
        small = choose_vae_attention(loaded, loaded.params, [Stage(64, 64, None)], show=True)
        assert small.vae_attention == "exact" and vae_attention_mode(loaded.pipe.vae) == "exact"
        large = choose_vae_attention(loaded, loaded.params, LARGE, show=True)
        assert large.vae_attention == "linear" and vae_attention_mode(loaded.pipe.vae) == "linear"
        assert "VAE attention: linear" in large.to_text()  # the PNG records the kernel used
        assert "measured on this VAE" in capsys.readouterr().err
    finally:
        loaded.patch.remove()
    assert vae_attention_mode(loaded.pipe.vae) == "exact"  # removing the job's patch undoes the choice


def test_auto_on_an_unmeasured_vae_stays_exact_and_warns_with_a_prediction(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "model"
    pipe = tiny_pipeline("sd15")
    pipe.save_pretrained(folder)
    LinFusion.from_unet(pipe.unet).save_pretrained(folder / "linfusion")
    loaded = load(GenerationParams(prompt="a red circle", model=str(folder)), "cpu")
    try:
        chosen = choose_vae_attention(loaded, loaded.params, LARGE, show=True)
    finally:
        loaded.patch.remove()
    warning = capsys.readouterr().err
    assert chosen.vae_attention == "exact"
    assert (
        "262,144 tokens" in warning and "predicted about" in warning and "--vae-attention linear" in warning
    )


def test_freed_memory_is_returned_only_for_tight_cpu_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc keeps freed memory for speed; a CPU plan without room for the heap that keeping builds up
    (``KEPT_MEMORY_FACTOR`` x its peak) runs with freed memory returned, so its resident peak follows the
    plan. GPU plans, and processes that never kept freed memory, are left alone."""
    from types import SimpleNamespace

    import torch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    roomy = SimpleNamespace(peak=100, budget=int(100 * KEPT_MEMORY_FACTOR))
    tight = SimpleNamespace(peak=100, budget=int(100 * KEPT_MEMORY_FACTOR) - 1)
    monkeypatch.setattr(app_run, "keeps_freed_memory", lambda: True)
    assert not returns_freed_memory(roomy, cpu)
    assert returns_freed_memory(tight, cpu)
    assert not returns_freed_memory(tight, cuda)
    assert not returns_freed_memory(None, cpu)
    monkeypatch.setattr(app_run, "keeps_freed_memory", lambda: False)
    assert not returns_freed_memory(tight, cpu)
