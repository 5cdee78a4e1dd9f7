"""Executing a prepared run: the allocator policy a plan needs."""

from __future__ import annotations

import pytest
import torch

from linfusion.app import execute as app_execute
from linfusion.app.execute import KEPT_MEMORY_FACTOR, returns_freed_memory


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
    monkeypatch.setattr(app_execute, "keeps_freed_memory", lambda: True)
    assert not returns_freed_memory(plan(100, plain_room, Savers()), cpu)
    assert returns_freed_memory(plan(100, plain_room - 1, Savers()), cpu)
    assert returns_freed_memory(plan(100, plain_room, chunked), cpu)  # savers fragment more
    assert not returns_freed_memory(plan(100, saver_room, chunked), cpu)
    assert not returns_freed_memory(plan(100, 100, chunked), cuda)
    assert not returns_freed_memory(None, cpu)
    monkeypatch.setattr(app_execute, "keeps_freed_memory", lambda: False)
    assert not returns_freed_memory(plan(100, 100, chunked), cpu)


def test_a_failed_save_keeps_the_image_and_names_the_copy(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import tempfile

    from PIL import Image

    from linfusion.app.execute import save_png_or_keep
    from linfusion.app.params import GenerationError, GenerationParams

    real_save = app_execute.save_png
    out = tmp_path / "full" / "x.png"
    out.parent.mkdir()

    def save(image, params, path):
        if path.parent == out.parent:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(image, params, path)

    monkeypatch.setattr(app_execute, "save_png", save)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "kept"))
    (tmp_path / "kept").mkdir()
    image = Image.new("RGB", (16, 8), (10, 20, 30))
    params = GenerationParams("a cat", width=16, height=8)
    with pytest.raises(GenerationError, match="No space left on device.*the image is kept at") as raised:
        save_png_or_keep(image, params, out)
    (kept,) = (tmp_path / "kept").glob("linfusion-x-*.png")
    assert str(kept) in str(raised.value)
    with Image.open(kept) as saved:
        assert saved.getpixel((0, 0)) == (10, 20, 30) and "a cat" in saved.info["parameters"]

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with pytest.raises(GenerationError, match="nor a copy in .*the image is lost"):
        save_png_or_keep(image, params, out)


def pixart_run(params, stages, tmp_path):
    """A run of ``params`` on a tiny PixArt pipeline, planned by hand (no savers): execute's part alone."""
    from linfusion.app.prepare import RunPlan
    from linfusion.pipelines.chain import unet_calls
    from linfusion.planner import MemoryPlan, Savers
    from linfusion.planner.plan import StagePlan

    planned = tuple(StagePlan(s.width, s.height, Savers(), 0, 0, 0) for s in stages)
    memory = MemoryPlan(2**40, torch.device("cpu"), planned)
    calls = tuple(unet_calls(s, params.steps, params.mode) for s in stages)
    return RunPlan(params, tuple(stages), calls, memory, out=tmp_path / "out.png")


def test_a_pixart_run_is_the_pipelines_image_and_its_png_repeats_it(tmp_path) -> None:
    """Plain and SDEdit runs on PixArt: the image of the PixArt steps for the recorded seed, the step
    callback called per step, the PNG's parameters those of the run."""
    import numpy as np

    from linfusion import LinFusion
    from linfusion.app.execute import execute
    from linfusion.app.loading import LoadedPipeline
    from linfusion.app.params import GenerationParams, read_png_parameters
    from linfusion.patches.base import Patch
    from linfusion.pipelines import dit, sdedit
    from linfusion.pipelines.chain import Stage
    from linfusion.testing import tiny_pipeline

    pipe = tiny_pipeline("pixart-sigma")
    LinFusion.construct_for(pipe, load_pretrained=False, init="teacher")
    params = GenerationParams(
        "a red circle", negative_prompt="blue", width=32, height=32, steps=3, guidance=3.0, seed=5,
        model="pixart", scheduler="dpm++", vae_attention="exact",
    )  # fmt: skip
    loaded = LoadedPipeline(pipe, torch.device("cpu"), params, Patch("test"))
    steps: list[int] = []

    def count(running, index, timestep, tensors):
        steps.append(index)
        return tensors

    result = execute(pixart_run(params, [Stage(32, 32, None)], tmp_path), loaded, count)
    expected = dit.text_to_image(
        pipe, "a red circle", 32, 32, negative_prompt="blue", num_inference_steps=3, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    assert np.array_equal(np.asarray(result.image), np.asarray(expected)) and steps == [0, 1, 2]
    assert read_png_parameters(result.path) == params

    chained = params.replace(mode="sdedit", width=64, height=64)
    stages = [Stage(32, 32, None), Stage(64, 64, 0.4)]
    result = execute(pixart_run(chained, stages, tmp_path), loaded)
    expected = sdedit(
        pipe, "a red circle", 64, 64, negative_prompt="blue", num_inference_steps=3, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(5), stage_plan=stages,
    )  # fmt: skip
    assert result.image.size == (64, 64)
    assert np.array_equal(np.asarray(result.image), np.asarray(expected))
    assert read_png_parameters(result.path) == chained
