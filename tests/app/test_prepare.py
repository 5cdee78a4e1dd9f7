"""Preparing requests: settling --vae-attention auto for the stages, and what the plan records."""

from __future__ import annotations

from pathlib import Path

import pytest

from linfusion import LinFusion
from linfusion.app.loading import load
from linfusion.app.params import GenerationParams
from linfusion.app.prepare import Budgets, RunPlan, choose_vae_attention, prepare
from linfusion.io import parse_size
from linfusion.pipelines.chain import Stage
from linfusion.planner import MemoryPlan
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
        chosen, notes = choose_vae_attention(
            loaded.params, loaded.pipe.vae, LARGE, loaded.device, loaded.pipe.dtype
        )
    finally:
        loaded.patch.remove()
    assert chosen == "exact"
    warning = " ".join(notes)
    assert (
        "262,144 tokens" in warning and "predicted about" in warning and "--vae-attention linear" in warning
    )


def test_the_command_line_the_web_ui_and_plan_prepare_the_same_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request, three front doors: ``linfusion generate`` (on the loaded pipeline), the web UI's backend
    (on its meta planning copy) and ``linfusion plan`` (on the structure built from the configs)."""
    from linfusion.app import run as app_run
    from linfusion.app.execute import RunResult
    from linfusion.app.plan import PlanRequest, make_plan
    from linfusion.cli import main
    from linfusion.ui.backend import Backend
    from linfusion.ui.requests import TextToImageRequest

    size, steps, budget = (128, 96), 10, "6GB"
    seen: list[RunPlan] = []

    def capture(run: RunPlan, loaded: object, *callbacks: object) -> RunResult:
        seen.append(run)
        return RunResult(None, run.params, run.out)  # type: ignore[arg-type]

    monkeypatch.setattr(app_run, "execute", capture)
    argv = ["generate", "a red circle", "--size", f"{size[0]}x{size[1]}", "--mode", "sdedit", "--steps",
            str(steps), "--device", "cpu", "--max-memory", budget, "--vae-attention", "exact", "--quiet",
            "--out", str(tmp_path / "x.png")]  # fmt: skip
    assert main(argv) == 0
    backend = Backend(["bundled"], tmp_path / "outputs", device="cpu")
    view = backend.plan(TextToImageRequest("a red circle", width=size[0], height=size[1], mode="sdedit",
                                           steps=steps, budget=budget, seed=3))  # fmt: skip
    planned = make_plan(PlanRequest(model="bundled", width=size[0], height=size[1], mode="sdedit",
                                    device="cpu", dtype="float32", max_memory=parse_size(budget), steps=steps,
                                    vae_attention="exact"))  # fmt: skip
    assert view.run is not None

    def summary(stages: object, memory: MemoryPlan, vae_attention: str) -> tuple:
        per_stage = [(s.width, s.height, s.savers, s.peak, s.host_peak, s.flops) for s in memory.stages]
        return tuple(stages), memory.budget, memory.host_budget, per_stage, vae_attention

    cli, ui = seen[0], view.run
    expected = summary(cli.stages, cli.memory, cli.vae_attention)
    assert [(s.width, s.height) for s in cli.stages] == [(32, 24), (64, 48), (128, 96)]
    assert summary(ui.stages, ui.memory, ui.vae_attention) == expected
    assert summary(planned.stages, planned.plan, planned.vae_attention) == expected
    assert cli.unet_calls == ui.unet_calls == planned.unet_calls


def test_a_prompt_longer_than_the_text_encoder_reads_is_noted() -> None:
    from types import SimpleNamespace

    from linfusion.app.prepare import prompt_length_notes

    class Tokenizer:  # one token per word, plus the start and end tokens, as CLIP counts
        model_max_length = 77

        def __call__(self, text: str, **kwargs: object) -> SimpleNamespace:
            return SimpleNamespace(input_ids=[0] * (len(text.split()) + 2))

    model = SimpleNamespace(tokenizer=Tokenizer())
    short = GenerationParams("a cat " * 30)
    assert prompt_length_notes(model, short) == []
    long = GenerationParams("word " * 1000, negative_prompt="blurry")
    (note,) = prompt_length_notes(model, long)
    assert (
        note
        == "note: the prompt is 1,002 tokens and the text encoder reads 77: its last 925 tokens are dropped"
    )
    assert prompt_length_notes(SimpleNamespace(tokenizer=SimpleNamespace(model_max_length=77)), long) == []


def test_a_dits_prompt_limit_is_its_pipelines_t5_length_and_its_stripes_whole_patches() -> None:
    """PixArt reads ``max_sequence_length`` T5 tokens (Alpha 120), not the tokenizer's own limit; a rank of
    a spatial-parallel run plans the tallest stripe of whole patches (2 latent rows), as the split cuts it."""
    from linfusion.app.prepare import prompt_length_notes, stripe_sizes
    from linfusion.parallel.layout import stripe_bounds
    from linfusion.pipelines.chain import Stage
    from linfusion.testing import tiny_pipeline

    pipe = tiny_pipeline("pixart-alpha")
    tokens = len(pipe.tokenizer("x" * 100, truncation=False).input_ids)
    assert pipe.tokenizer.model_max_length < tokens <= 120
    assert prompt_length_notes(pipe, GenerationParams("x" * 100)) == []
    (note,) = prompt_length_notes(pipe, GenerationParams("x" * 200))
    assert "the text encoder reads 120" in note
    rows = max(stop - start for start, stop in stripe_bounds(22, 3, 2))  # 44 px: 22 latent rows, 11 patches
    assert rows == 8  # 4 + 4 + 3 patches
    assert stripe_sizes(pipe, [Stage(64, 44, None)], 3) == [(64, rows * 2)]
