"""The high-resolution chain benchmark: stage records, the SDPA cap, outputs; the random full-size models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from linfusion import LinFusion
from linfusion.cli import main as linfusion
from linfusion.pipelines import plan_stages
from linfusion.testing import tiny_pipeline

pytestmark = [pytest.mark.multiprocess]


def test_chain_benchmark_records_every_stage_and_stops_sdpa_at_the_cap(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    pipe = tiny_pipeline("sd15")
    pipe.save_pretrained(folder)
    LinFusion.from_unet(pipe.unet, init="teacher").save_pretrained(folder / "linfusion")
    out = tmp_path / "results"
    code = linfusion(["bench", "highres", "--model", str(folder), "--size", "128x64", "--steps", "2", "--out", str(out), "--tag", "t",
                 "--sdpa-cap-seconds", "0", "--timeout", "300"])  # fmt: skip
    assert code == 0
    result = json.loads(
        (out / f"highres-cpu-{str(folder).replace('/', '_')}-sdedit-128x64-t.json").read_text()
    )
    runs = {run["attention"]: run for run in result["runs"]}
    expected = [(s.width, s.height) for s in plan_stages(128, 64, base_long_side=32)]
    linear = runs["linfusion"]
    assert linear["completed"] and [(s["width"], s["height"]) for s in linear["stages"]] == expected
    assert all(
        s["seconds"] > 0 and s["peak_bytes"] > 0 and s["finite"] and s["steps"] >= 1 for s in linear["stages"]
    )
    assert linear["stages"][0]["steps"] == 2  # the base runs every step; later stages by strength
    soft = runs["sdpa"]  # a zero cap: measured once, then the next stage's prediction stops the chain
    assert not soft["completed"] and soft["stages"][0]["seconds"] > 0
    assert (
        soft["stages"][1]["skipped"]
        and soft["stages"][1]["predicted_seconds"] > 0
        and len(soft["stages"]) == 2
    )
    assert result["stage_ratios"][0]["width"] == expected[0][0]
    assert "linfusion bench highres" in result["environment"]["command"]
    assert "skipped: predicted" in next(out.glob("*.md")).read_text()


def test_chain_benchmark_with_linear_vae_and_a_memory_plan(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    tiny_pipeline("sd15").save_pretrained(folder)
    out = tmp_path / "results"
    code = linfusion(["bench", "highres", "--model", str(folder), "--size", "64x64", "--steps", "2", "--out", str(out), "--attention", "sdpa",
                 "--vae-attention", "linear", "--max-memory", "8GB", "--timeout", "300"])  # fmt: skip
    assert code == 0
    path = out / f"highres-cpu-{str(folder).replace('/', '_')}-sdedit-64x64-linear-vae.json"
    result = json.loads(path.read_text())
    assert result["config"]["vae_attention"] == "linear" and result["config"]["max_memory"] == "8GB"
    stages = result["runs"][0]["stages"]
    assert len(stages) == 2 and all(s["planned_peak_bytes"] > 0 and s["savers"] for s in stages)
    assert "VAE mid-block attention: linear" in path.with_suffix(".md").read_text()


def test_a_timed_out_child_keeps_the_stages_it_finished() -> None:
    from linfusion.bench.highres import _finished_stages

    stderr = 'plan...\n{"stage_done": {"stage": 1, "seconds": 2.5}}\nnoise\n{"stage_done": {"stage": 2, "seconds": 9}}\n'
    assert _finished_stages(stderr) == [{"stage": 1, "seconds": 2.5}, {"stage": 2, "seconds": 9}]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--guidance", "nan"], "--guidance must be a finite number"),
    ],
)
def test_bad_counts_are_refused_before_loading(
    capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    from linfusion.cli import main

    assert main(["bench", "highres", "--size", "64x64", *argv]) == 2
    assert message in capsys.readouterr().err
