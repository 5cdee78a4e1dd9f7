"""The web UI's backend on the bundled model: checks, plans, jobs, the PNGs it writes and reads back."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from linfusion.app.loading import load_pipeline, resolve_model
from linfusion.cli import main
from linfusion.errors import UserError
from linfusion.io import parse_size, size_flag
from linfusion.model import mounted_on
from linfusion.ui import backend as backend_module
from linfusion.ui import outputs as outputs_module
from linfusion.ui.backend import Backend
from linfusion.ui.jobs import Job
from linfusion.ui.outputs import open_upload
from linfusion.ui.requests import TextToImageRequest, UpscaleRequest
from linfusion.vae_attention import vae_attention_mode

PROMPT = "a large red circle on the left , on a gray background"


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Backend:
    backend = Backend(["bundled"], tmp_path_factory.mktemp("outputs"), device="cpu")
    backend.load_all()
    return backend


def run(work, request) -> tuple:
    """Run one job's work in this thread; returns its result and the (stage, step, steps) it reported."""
    reported = []
    job = Job(1, "test", "test", lambda job: None)
    original = job.step_done

    def step_done(stage, step, steps=None):
        reported.append((stage, step, steps))
        original(stage, step, steps)

    job.step_done = step_done
    return work(request, job), reported, job


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"width": 33},
            "width 33 is not a positive multiple of 8 (the VAE works in blocks of 8 pixels); try 32",
        ),
        ({"height": 0}, "height 0 is not a positive multiple of 8"),
        ({"prompt": "  "}, "the prompt is empty: say what to draw"),
        ({"guidance": float("nan")}, "guidance nan: use a number from 0 to 100"),
        ({"steps": 0}, "steps must be a whole number >= 1"),
        ({"steps": None}, "steps is empty: enter a number (e.g. 25)"),
        ({"guidance": None}, "guidance is empty: enter a number (e.g. 7.5)"),
        ({"guidance": ""}, "guidance is empty"),
        ({"seed": None}, "seed is empty: enter a number (e.g. -1 for a random one)"),
        ({"steps": 1000}, "steps 1000: at most 500"),
        ({"width": 65536}, "width 65536 is larger than this page accepts (32768 px)"),
        ({"model": "/etc"}, "model '/etc' is not one this server was started with (bundled)"),
        ({"seed": 1.5}, "seed must be a whole number"),
        ({"sampler": "warp"}, "unknown sampler 'warp'"),
    ],
)
def test_bad_requests_are_refused_with_what_to_change(backend: Backend, changes: dict, message: str) -> None:
    request = TextToImageRequest(**{"prompt": PROMPT, "width": 32, "height": 32, **changes})
    with pytest.raises(UserError) as error:
        backend.params_for(request)
    assert message in str(error.value)
    if "prompt" not in changes:
        assert backend.plan(request).text == f"Cannot plan: {error.value}"


@pytest.mark.slow
def test_plan_fits_or_names_the_smallest_budget_that_fits(backend: Backend) -> None:
    request = TextToImageRequest(PROMPT, width=64, height=64, mode="sdedit", steps=10, budget="1MB")
    refused = backend.plan(request)
    assert not refused.fits and refused.smallest_budget > parse_size("1MB")
    entry = size_flag(refused.smallest_budget)
    assert refused.text.startswith("Does not fit the budget of 1 MiB")
    assert f"enter {entry} as the memory budget" in refused.text
    request.budget = entry
    accepted = backend.plan(request)
    assert accepted.fits and accepted.text.startswith("Fits: estimated peak")
    assert [line.split(":")[0] for line in accepted.text.splitlines()[1:]] == [
        "stage 1 32x32, 10 steps",
        "stage 2 64x64, 4 steps",
    ]
    assert (
        "cannot read memory size 'lots'"
        in backend.plan(TextToImageRequest(PROMPT, width=32, height=32, budget="lots")).text
    )


@pytest.mark.slow
def test_planning_leaves_the_loaded_pipeline_alone(backend: Backend) -> None:
    pipe = backend.slot("bundled").pipe
    before = (mounted_on(pipe.unet), vae_attention_mode(pipe.vae))
    for linfusion, vae in ((True, "linear"), (False, "exact"), (False, "linear")):
        request = TextToImageRequest(PROMPT, width=32, height=32, linfusion=linfusion, vae_attention=vae)
        assert backend.plan(request).fits
    assert (mounted_on(pipe.unet), vae_attention_mode(pipe.vae)) == before


def test_a_job_undoes_what_it_applied_to_the_loaded_pipeline(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    slot = backend.slot("bundled")
    pipe = slot.pipe
    assert mounted_on(pipe.unet) is None and vae_attention_mode(pipe.vae) == "exact"
    request = TextToImageRequest(PROMPT, width=32, height=32, steps=2, seed=1, vae_attention="linear",
                                 sampler="euler")  # fmt: skip
    seen = []

    def look(pipeline, index, timestep, tensors):
        seen.append(
            (mounted_on(pipeline.unet), vae_attention_mode(pipeline.vae), type(pipeline.scheduler).__name__)
        )
        return tensors

    monkeypatch.setattr(backend_module, "_step_callback", lambda job, preview=None: look)
    result, _, job = run(backend.text_to_image, request)
    assert seen == [(slot.linfusion, "linear", "EulerDiscreteScheduler")] * 2  # as the request asked
    assert mounted_on(pipe.unet) is None and vae_attention_mode(pipe.vae) == "exact"  # and undone
    assert pipe.scheduler is slot.scheduler
    assert [caption for _, caption in job.stage_images] == ["1: 32x32"]  # a plain run is one stage
    assert "Sampler: euler" in result.parameters and "VAE attention: linear" in result.parameters


def test_a_job_writes_a_new_png_each_time_with_its_parameters(backend: Backend) -> None:
    request = TextToImageRequest(
        PROMPT, negative_prompt="blurry", width=32, height=32, steps=6, guidance=4, seed=7
    )
    first, reported, _ = run(backend.text_to_image, request)
    second, _, _ = run(backend.text_to_image, request)
    assert first.path != second.path and first.path.parent == second.path.parent == backend.outputs
    assert np.array_equal(pixels(first.path), pixels(second.path))  # same seed, same image, new file
    umask = os.umask(0)
    os.umask(umask)
    assert first.path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any new file, not 0600
    with Image.open(first.path) as image:
        assert image.info["parameters"] == first.parameters
    assert first.parameters == (
        f"{PROMPT}\nNegative prompt: blurry\nSteps: 6, Sampler: ddim, CFG scale: 4.0, Size: 32x32, Seed: 7, "
        "LinFusion: auto, Dtype: auto, Mode: plain, VAE attention: exact, Model: bundled"
    )
    assert reported == [(0, step, 6) for step in range(1, 7)]
    assert not list(backend.outputs.glob(".*.tmp"))  # no temporary file left behind
    drawn, _, _ = run(
        backend.text_to_image, TextToImageRequest(PROMPT, width=32, height=32, steps=2, seed=-1)
    )
    assert drawn.seed >= 0 and f"Seed: {drawn.seed}," in drawn.parameters


def test_linfusion_off_is_the_models_own_attention_and_on_again_is_linfusion(backend: Backend) -> None:
    def image(linfusion: bool) -> np.ndarray:
        request = TextToImageRequest(PROMPT, width=32, height=32, steps=4, seed=3, linfusion=linfusion)
        return pixels(run(backend.text_to_image, request)[0].path)

    linear, softmax, linear_again = image(True), image(False), image(True)
    assert np.array_equal(linear, linear_again)
    assert np.abs(linear - softmax).max() > 0
    fresh = load_pipeline(resolve_model("bundled"), backend.device, backend.dtype)  # never had LinFusion
    fresh.set_progress_bar_config(disable=True)
    import torch

    reference = fresh(PROMPT, width=32, height=32, num_inference_steps=4, guidance_scale=7.5,
                      generator=torch.Generator("cpu").manual_seed(3)).images[0]  # fmt: skip
    assert np.array_equal(softmax, np.asarray(reference).astype(int))  # unmounted exactly


def test_a_chain_reports_the_steps_it_planned(backend: Backend) -> None:
    request = TextToImageRequest(PROMPT, width=128, height=128, mode="sdedit", steps=10, seed=1)
    result, reported, job = run(backend.text_to_image, request)
    planned = [(stage.width, stage.height, stage.steps) for stage in job.stages]
    assert planned == [(32, 32, 10), (64, 64, 4), (128, 128, 1)]
    last_step = {stage: (step, steps) for stage, step, steps in reported}
    assert last_step == {0: (10, 10), 1: (4, 4), 2: (1, 1)}  # the pipeline ran what the page announced
    assert [caption for _, caption in job.stage_images] == [
        "1: 32x32",
        "2: 64x64",
        "3: 128x128",
    ]
    assert (result.width, result.height) == (128, 128)


def test_demofusion_runs_its_own_stage_plan(backend: Backend) -> None:
    request = TextToImageRequest(PROMPT, width=64, height=64, mode="demofusion", steps=8, seed=2)
    result, reported, job = run(backend.text_to_image, request)
    planned = [(stage.width, stage.height, stage.steps) for stage in job.stages]
    assert planned == [(32, 32, 8), (64, 64, 2)]  # the SD-XL strength 0.32: int(8 x 0.32) steps
    assert {stage: (step, steps) for stage, step, steps in reported} == {0: (8, 8), 1: (2, 2)}
    assert "Mode: demofusion" in result.parameters and (result.width, result.height) == (64, 64)


@pytest.mark.slow
def test_the_command_line_remakes_a_png_written_by_the_page(backend: Backend, tmp_path: Path) -> None:
    request = TextToImageRequest(
        PROMPT, width=64, height=64, mode="sdedit", steps=5, seed=11, vae_attention="linear"
    )
    made, _, _ = run(backend.text_to_image, request)
    again = tmp_path / "again.png"
    assert (
        main(["generate", "--from-png", str(made.path), "--out", str(again), "--device", "cpu", "--quiet"])
        == 0
    )
    assert np.array_equal(pixels(made.path), pixels(again))


def test_a_dropped_png_gives_back_its_fields(backend: Backend, tmp_path: Path) -> None:
    request = TextToImageRequest(PROMPT, negative_prompt="dark", width=48, height=40, mode="sdedit", steps=3, guidance=3.5, seed=1234,
                                 linfusion=False, vae_attention="linear", sampler="euler")  # fmt: skip
    made, _, _ = run(backend.text_to_image, request)
    fields, note = backend.read_parameters(made.path)
    assert fields == {"prompt": PROMPT, "negative_prompt": "dark", "width": 48, "height": 40, "steps": 3,
                      "guidance": 3.5, "seed": 1234, "mode": "sdedit", "linfusion": False,
                      "vae_attention": "linear", "sampler": "euler", "model": "bundled"}  # fmt: skip
    assert note == f"Restored the parameters of {made.path.name}."

    foreign = tmp_path / "foreign.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", made.parameters.replace("Model: bundled", "Model: someorg/other"))
    Image.new("RGB", (8, 8)).save(foreign, pnginfo=info)
    fields, note = backend.read_parameters(foreign)
    assert (
        "model" not in fields
        and "made with model someorg/other, which this server was not started with" in note
    )

    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    for path, message in (
        (plain, "plain.png has no 'parameters' text chunk"),
        (photo, "photo.jpg is a JPEG file; drop a PNG"),
        (junk, "junk.png is not a readable image (PNG, JPEG or WebP expected)"),
    ):
        with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
            backend.read_parameters(path)


def test_uploads_to_enlarge_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = tmp_path / "small.png"
    Image.new("RGB", (4, 16)).save(small)
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (16, 16)).save(gif)
    large = tmp_path / "large.png"
    Image.new("RGB", (64, 64)).save(large)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(large.read_bytes()[:60])
    assert open_upload(large).size == (64, 64)
    monkeypatch.setattr(outputs_module, "MAX_UPLOAD_PIXELS", 32 * 32)
    for path, message in (
        (small, "small.png is 4x16; it needs at least 8 pixels per side"),
        (gif, "anim.gif is a GIF image; upload a PNG, JPEG or WebP"),
        (large, "large.png is 64x64; this page enlarges images of up to 1,024 pixels"),
        (truncated, "truncated.png is not a readable image"),
        (None, "no file was uploaded"),
    ):
        with pytest.raises(UserError) as error:
            open_upload(path)
        assert str(error.value).startswith(message)
        assert str(tmp_path) not in str(error.value)  # the page is not told where the server keeps files


def test_upscale_enlarges_an_upload_and_records_it(backend: Backend, tmp_path: Path) -> None:
    source = tmp_path / "source.png"
    made, _, _ = run(backend.text_to_image, TextToImageRequest(PROMPT, width=32, height=32, steps=4, seed=5))
    Image.open(made.path).save(source)
    request = UpscaleRequest(str(source), scale=2, prompt=PROMPT, steps=5, seed=9)
    assert backend.plan(UpscaleRequest(None)).text == "Upload an image to see the plan."
    assert backend.plan(UpscaleRequest(str(tmp_path / "gone.png"))).text == "Upload an image to see the plan."
    planned = backend.plan(request)
    assert planned.fits and planned.text.splitlines()[1].startswith("stage 1 64x64, 2 steps: peak ~")
    result, reported, job = run(backend.upscale, request)
    assert (result.width, result.height) == (64, 64)
    assert "Size: 64x64" in result.parameters and "Mode: sdedit" in result.parameters
    assert [caption for _, caption in job.stage_images] == ["1: 64x64"]
    assert {stage: (step, steps) for stage, step, steps in reported} == {0: (2, 2)}  # as the plan said
    dilated, reported, job = run(
        backend.upscale, UpscaleRequest(str(source), scale=1.5, mode="demofusion", steps=8)
    )
    assert "Upscaled from: source.png, Upscale factor: 2" in result.parameters  # the source and the scale
    with Image.open(result.path) as written:
        assert written.info["parameters"] == result.parameters
    assert (dilated.width, dilated.height) == (48, 48) and "Mode: demofusion" in dilated.parameters
    assert "Upscale factor: 1.5" in dilated.parameters
    assert [(stage.width, stage.height, stage.steps) for stage in job.stages] == [(48, 48, 2)]  # SD-XL's 0.32
    assert {stage: (step, steps) for stage, step, steps in reported} == {0: (2, 2)}
    for scale, message in (
        (1.0, "scale 1.0: enlarge by more than 1 (e.g. 2)"),
        (float("inf"), "scale inf: enlarge by a number such as 2 or 4"),
        (2048, "32x32 x 2048 is larger than this page accepts (32768 px)"),
    ):
        assert backend.plan(UpscaleRequest(str(source), scale=scale)).text == f"Cannot plan: {message}"


@pytest.mark.slow
def test_a_budget_beyond_the_device_is_refused_and_never_advised(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    total = backend.models.device_memory()
    over = TextToImageRequest(PROMPT, width=32, height=32, budget=size_flag(2 * total))
    with pytest.raises(UserError, match=r"more than this cpu device has \(.*\): enter at most"):
        list(backend._plan(over, None))
    assert backend.plan(over).text.startswith("Cannot plan: memory budget")
    monkeypatch.setattr(backend.models, "device_memory", lambda: 2 * 2**20)  # a device of 2 MiB
    refused = backend.plan(TextToImageRequest(PROMPT, width=64, height=64, budget="1MB"))
    assert not refused.fits and "enter " not in refused.text
    assert "more than all the memory of this cpu device (2 MiB): choose a smaller size" in refused.text


@pytest.mark.slow
def test_the_plan_counts_the_steps_asked(backend: Backend) -> None:
    for steps, expected in ((12, ["12", "4"]), (60, ["60", "24"])):
        request = TextToImageRequest(PROMPT, width=64, height=64, mode="sdedit", steps=steps)
        lines = backend.plan(request).text.splitlines()[1:]
        assert [line.split(", ")[1].split(" ")[0] for line in lines] == expected
        _, reported, _ = run(backend.text_to_image, dataclasses.replace(request, seed=1, steps=steps))
        ran = {stage: steps for stage, _, steps in reported}
        assert [str(ran[0]), str(ran[1])] == expected  # the run counts what the plan said


def test_the_live_preview_shows_the_colours_the_latents_encode_in_a_small_image(backend: Backend) -> None:
    import torch

    from linfusion.ui.preview import PREVIEW_SIDE, fit_latent_preview

    vae = backend.slot("bundled").pipe.vae
    preview = fit_latent_preview(vae)
    for colour in ((220, 30, 30), (30, 200, 40), (128, 128, 128)):
        pixels = torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 64, 64) / 127.5 - 1
        with torch.no_grad():
            latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
        shown = np.asarray(preview.image(latents)).reshape(-1, 3).mean(axis=0)
        assert np.abs(shown - np.array(colour)).max() < 60, (colour, shown)  # a cheap, linear look
        if len(set(colour)) > 1:
            assert shown.argmax() == int(np.argmax(colour))  # the dominant colour stays dominant
    large = torch.zeros(1, latents.shape[1], 1024, 512)  # the latents of a 4K x 8K image
    assert preview.image(large).size == (PREVIEW_SIDE // 2, PREVIEW_SIDE) and PREVIEW_SIDE <= 256


def test_a_16_bit_upload_is_scaled_to_8_bits_not_read_as_white(tmp_path: Path) -> None:
    """The page reads uploads as every command reads images: 16-bit greyscale scaled by 1/257."""
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((32, 32), 30000, dtype=np.uint16)).save(path)
    pixels = np.asarray(open_upload(path))
    assert pixels.shape == (32, 32, 3) and (pixels == round(30000 / 257)).all()
