"""Running requests: settling --vae-attention auto for the stages, and what it records."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
    (``KEPT_MEMORY_FACTOR`` x its activations) runs with freed memory returned, so its resident peak follows the
    plan. GPU plans, and processes that never kept freed memory, are left alone. The factor is larger for
    stages with savers, whose long-lived tensors fragment the heap more."""
    from types import SimpleNamespace

    from linfusion.planner import Savers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def plan(peak: int, budget: int, savers: Savers) -> SimpleNamespace:
        stage = SimpleNamespace(peak=peak, weights=10, savers=savers)
        return SimpleNamespace(budget=budget, stages=[stage])

    chunked = Savers(feed_forward_chunk=4096)
    plain_room = 10 + int(90 * KEPT_MEMORY_FACTOR["no savers"])
    saver_room = 10 + int(90 * KEPT_MEMORY_FACTOR["savers"])
    monkeypatch.setattr(app_run, "keeps_freed_memory", lambda: True)
    assert not returns_freed_memory(plan(100, plain_room, Savers()), cpu)
    assert returns_freed_memory(plan(100, plain_room - 1, Savers()), cpu)
    assert returns_freed_memory(plan(100, plain_room, chunked), cpu)  # savers fragment more
    assert not returns_freed_memory(plan(100, saver_room, chunked), cpu)
    assert not returns_freed_memory(plan(100, 100, chunked), cuda)
    assert not returns_freed_memory(None, cpu)
    monkeypatch.setattr(app_run, "keeps_freed_memory", lambda: False)
    assert not returns_freed_memory(plan(100, 100, chunked), cpu)


def test_a_run_predicted_over_a_minute_is_announced_with_its_flops(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The plan's FLOPs over this device's sustained rate; announced only past ``ANNOUNCE_SECONDS``, and
    never with ``quiet``."""
    from linfusion.app.timing import ANNOUNCE_SECONDS, predicted_seconds

    pipe = tiny_pipeline("sd15")
    stages = [Stage(64, 64, None)]
    plan = app_run.plan_memory(pipe, stages, "8GB", 7.5, quiet=True, steps=4)
    assert plan.flops > 0
    real = predicted_seconds(plan.flops, torch.device("cpu"), torch.float32)
    assert real is not None and 0 < real < ANNOUNCE_SECONDS  # a tiny model: seconds at most
    for seconds, quiet, announced in ((ANNOUNCE_SECONDS * 2, False, True), (ANNOUNCE_SECONDS / 2, False, False),
                                      (ANNOUNCE_SECONDS * 2, True, False)):  # fmt: skip
        monkeypatch.setattr(app_run, "predicted_seconds", lambda flops, device, dtype, s=seconds: s)
        app_run.plan_memory(pipe, stages, "8GB", 7.5, quiet=quiet, steps=4)
        err = capsys.readouterr().err
        assert ("predicted: about 2.0 min" in err) == announced, err
        if announced:
            assert f"{plan.flops:.2g} FLOPs" in err
