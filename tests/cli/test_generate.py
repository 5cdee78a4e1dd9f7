"""``linfusion generate`` on a tiny pipeline folder: PNG, reproducible parameters, clear errors."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from linfusion import LinFusion
from linfusion.app.params import GenerationParams, read_png_parameters
from linfusion.cli import main
from linfusion.testing import tiny_pipeline
from support.pngs import png_header_only


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD pipeline folder with its own LinFusion weights in ``linfusion/`` (the bundled layout)."""
    folder = tmp_path_factory.mktemp("model")
    pipe = tiny_pipeline("sd15")
    pipe.save_pretrained(folder)
    LinFusion.from_unet(pipe.unet, init="teacher").save_pretrained(folder / "linfusion")
    return folder


def cli(model: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "generate",
            "a red circle",
            "--model",
            str(model),
            "--out",
            str(out),
            "--steps",
            "2",
            "--quiet",
            *extra,
        ]
    )


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_writes_a_png_whose_parameters_reproduce_it(model: Path, tmp_path: Path) -> None:
    first = tmp_path / "first.png"
    assert cli(model, first, "--seed", "3", "--negative-prompt", "blurry, dark", "--guidance", "5") == 0
    image = Image.open(first)
    assert image.size == (32, 32)  # native: sample_size 16 x VAE factor 2
    assert image.info["parameters"].startswith("a red circle\nNegative prompt: blurry, dark\nSteps: 2")
    params = read_png_parameters(first)
    assert (params.seed, params.guidance, params.width, params.negative_prompt) == (
        3,
        5.0,
        32,
        "blurry, dark",
    )
    assert params.model == str(model) and params.linfusion == "auto"

    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(first), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(pixels(first), pixels(again))
    other_seed = tmp_path / "other.png"
    assert cli(model, other_seed, "--seed", "4", "--negative-prompt", "blurry, dark", "--guidance", "5") == 0
    assert not np.array_equal(pixels(first), pixels(other_seed))


def test_linfusion_is_used_by_default_and_can_be_turned_off(model: Path, tmp_path: Path) -> None:
    assert cli(model, tmp_path / "linear.png") == 0
    assert cli(model, tmp_path / "softmax.png", "--no-linfusion") == 0
    assert cli(model, tmp_path / "explicit.png", "--linfusion", str(model / "linfusion")) == 0
    assert "LinFusion: none" in Image.open(tmp_path / "softmax.png").info["parameters"]
    assert not np.array_equal(pixels(tmp_path / "linear.png"), pixels(tmp_path / "softmax.png"))
    assert np.array_equal(pixels(tmp_path / "linear.png"), pixels(tmp_path / "explicit.png"))


def test_size_and_scheduler_options(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "wide.png"
    assert cli(model, out, "--size", "48x32", "--scheduler", "euler") == 0
    assert Image.open(out).size == (48, 32)
    assert read_png_parameters(out).scheduler == "euler"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--size", "500x512"], "width 500 is not a positive multiple of 8"),
        (["--model", "/no/such/model"], "--model '/no/such/model': no such folder"),
        (
            ["--model", "someorg/some-model"],
            "the Hub is offline here (HF_HUB_OFFLINE=1) and it is not in the local cache",
        ),
        (["--scheduler", "warp"], "unknown scheduler 'warp'"),
    ],
)
def test_bad_input_is_refused_without_a_file(
    model: Path, tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    out = tmp_path / "never.png"
    assert cli(model, out, *extra) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_empty_prompt_and_unwritable_output(model: Path, tmp_path: Path, capsys) -> None:
    assert main(["generate", "  ", "--model", str(model), "--out", str(tmp_path / "x.png")]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli(model, blocker / "out.png") == 2
    assert "cannot write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_file(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real_save = Image.Image.save

    def save(image: Image.Image, target, *args, **kwargs) -> None:
        if image.size == (64, 32):  # the second stage's PNG, written (to a temporary file) before --out
            target.write(b"the first bytes of a PNG")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(image, target, *args, **kwargs)

    usage = SimpleNamespace(total=10**9, used=10**9 - 5 * 2**20, free=5 * 2**20)
    monkeypatch.setattr(Image.Image, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    stages, out = tmp_path / "stages", tmp_path / "big.png"
    assert cli(model, out, "--mode", "sdedit", "--size", "64x32", "--save-stages", str(stages)) == 2
    err = capsys.readouterr().err
    assert err == (
        f"linfusion generate: cannot write {stages / 'stage-2-64x32.png'} (No space left on device, "
        "5 MiB free on its disk); free some space there or write to another disk\n"
    )
    assert sorted(p.name for p in stages.iterdir()) == ["stage-1-32x16.png"]  # no temporary, no half PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages"]


def test_sdedit_mode_and_upscale_commands(model: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    assert (
        cli(model, big, "--mode", "sdedit", "--size", "128x64", "--save-stages", str(tmp_path / "stages"))
        == 0
    )
    assert Image.open(big).size == (128, 64)
    assert "Mode: sdedit" in Image.open(big).info["parameters"]
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == [
        "stage-1-32x16.png", "stage-2-64x32.png", "stage-3-128x64.png",
    ]  # fmt: skip
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(big), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(pixels(big), pixels(again))

    upscaled = tmp_path / "up.png"
    arguments = [
        "upscale",
        str(big),
        "--scale",
        "2",
        "--model",
        str(model),
        "--out",
        str(upscaled),
        "--quiet",
    ]
    assert main([*arguments, "--steps", "2"]) == 0
    assert Image.open(upscaled).size == (256, 128)
    assert (
        main(["upscale", str(tmp_path / "missing.png"), "--scale", "2", "--out", str(tmp_path / "x.png")])
        == 2
    )
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_demofusion_mode_reproduces_from_its_png_and_upscales(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo.png"
    assert cli(model, out, "--mode", "demofusion", "--size", "64x64") == 0
    assert "Mode: demofusion" in Image.open(out).info["parameters"]
    sdedit_out = tmp_path / "sdedit.png"
    assert cli(model, sdedit_out, "--mode", "sdedit", "--size", "64x64") == 0
    assert not np.array_equal(pixels(out), pixels(sdedit_out))  # the recipes differ
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(pixels(out), pixels(again))
    upscaled = tmp_path / "up.png"
    arguments = ["upscale", str(out), "--scale", "2", "--mode", "demofusion", "--model", str(model)]
    assert main([*arguments, "--out", str(upscaled), "--steps", "2", "--quiet"]) == 0
    assert Image.open(upscaled).size == (128, 128)
    assert "Mode: demofusion" in Image.open(upscaled).info["parameters"]


def test_vae_attention_option_is_recorded_and_reproduced(model: Path, tmp_path: Path, capsys) -> None:
    exact, linear, again = (tmp_path / f"{name}.png" for name in ("exact", "linear", "again"))
    assert cli(model, exact, "--size", "64x64") == 0
    assert cli(model, linear, "--size", "64x64", "--vae-attention", "linear") == 0
    assert "VAE attention: linear" in Image.open(linear).info["parameters"]
    assert read_png_parameters(exact).vae_attention == "exact"
    assert main(["generate", "--from-png", str(linear), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(pixels(linear), pixels(again))
    difference = np.abs(pixels(linear).astype(int) - pixels(exact).astype(int))
    assert difference.max() > 0 and difference.mean() < 8  # the decoder's attention kernel, nothing else
    with pytest.raises(SystemExit):
        cli(model, tmp_path / "bad.png", "--vae-attention", "fast")
    assert "invalid choice: 'fast'" in capsys.readouterr().err


# ---------------------------------------------------------------- every bad input refused cleanly
def refused(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run ``linfusion ARGV``; assert exit 2 and no traceback; return the message on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("linfusion ")
    return err


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nan", "--guidance must be a finite number >= 0 (1 or less means no guidance"),
        ("inf", "--guidance must be a finite number >= 0"),
        ("-2", "--guidance must be a finite number >= 0"),
    ],
)
def test_guidance_that_is_not_a_finite_non_negative_number_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, value: str, message: str
) -> None:
    out = tmp_path / "never.png"
    err = refused(capsys, ["generate", "a red circle", "--guidance", value, "--out", str(out)])
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_png_is_refused_by_from_png(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("remember the milk")
    err = refused(capsys, ["generate", "--from-png", str(notes), "--out", str(tmp_path / "x.png")])
    assert f"cannot read {notes} as an image" in err
    err = refused(
        capsys, ["generate", "--from-png", str(tmp_path / "gone.png"), "--out", str(tmp_path / "x.png")]
    )
    assert "gone.png: no such file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_upscaling_an_image_too_small_for_the_model_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    one_pixel = tmp_path / "one_pixel.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(one_pixel)
    out = tmp_path / "up.png"
    err = refused(capsys, ["upscale", str(one_pixel), "--scale", "2", "--out", str(out), "--steps", "2"])
    assert "(1x1) is too small for this model" in err and "at least 8 pixels" in err  # the bundled model
    assert not out.exists()


@pytest.mark.parametrize(("scale", "message"), [("nan", "--scale must be > 1"), ("0", "--scale must be > 1"),
                                                ("1.01", "nothing to do; use a larger --scale")])  # fmt: skip
def test_upscale_scales_that_cannot_enlarge_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, scale: str, message: str
) -> None:
    image = tmp_path / "small.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    out = tmp_path / "up.png"
    assert message in refused(capsys, ["upscale", str(image), "--scale", scale, "--out", str(out)])
    assert not out.exists()


def test_a_users_mistake_is_one_line_and_a_bug_an_internal_error_with_its_traceback_on_v(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["generate", "a red circle", "--guidance", "nan", "--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "--guidance must be" in err
    assert main([*argv, "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "GenerationError" in err and "--guidance must be" in err

    import linfusion.app.run

    for bug in (RuntimeError("a bug"), ValueError("a bug that looks like a bad value")):

        def broken(*args: object, bug: Exception = bug, **kwargs: object) -> None:
            raise bug

        monkeypatch.setattr(linfusion.app.run, "generate", broken)
        assert main(["generate", "a red circle", "--out", str(tmp_path / "x.png")]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1
        assert f"linfusion generate: internal error: {type(bug).__name__}: {bug} (run with -v" in err
        assert main(["generate", "a red circle", "--out", str(tmp_path / "x.png"), "-v"]) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "internal error" in err


def test_seed_minus_one_draws_a_seed_the_png_records_and_from_png_repeats(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    first, second, again = (tmp_path / f"{name}.png" for name in ("first", "second", "again"))
    for out in (first, second):
        assert main(["generate", "a large red circle in the center , on a white background", "--seed", "-1",
                     "--steps", "2", "--out", str(out), "--quiet"]) == 0  # fmt: skip
    seeds = [read_png_parameters(path).seed for path in (first, second)]
    assert all(0 <= seed < 2**32 for seed in seeds) and seeds[0] != seeds[1]
    assert main(["generate", "--from-png", str(first), "--out", str(again), "--quiet"]) == 0
    assert read_png_parameters(again).seed == seeds[0]
    assert np.array_equal(pixels(first), pixels(again))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_pngs_get_the_umask_mode_also_when_replacing_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture, umask: int
) -> None:
    out = tmp_path / "image.png"
    previous = os.umask(umask)
    try:
        assert main(["generate", "a small red circle on the left , on a gray background", "--steps", "2",
                     "--out", str(out), "--quiet"]) == 0  # fmt: skip
        assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
        out.chmod(0o644)
        assert main(["generate", "a small red circle on the left , on a gray background", "--steps", "2",
                     "--seed", "5", "--out", str(out), "--quiet"]) == 0  # fmt: skip
        assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
        assert read_png_parameters(out).seed == 5  # it was replaced
    finally:
        os.umask(previous)
    assert capsys.readouterr().out.splitlines() == [str(out), str(out)]  # --quiet: only the path


def test_bundled_model_names_the_words_it_does_not_know(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["generate", "a cat on a sofa", "--steps", "2", "--out", str(tmp_path / "cat.png")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1
    assert "does not know 'cat', 'sofa'" in notes[0] and "shapes (circle/square/triangle)" in notes[0]
    assert main(["generate", "a cat on a sofa", "--model", str(model), "--steps", "2",
                 "--out", str(tmp_path / "tiny-cat.png")]) == 0  # fmt: skip
    assert "note:" not in capsys.readouterr().err  # not the bundled model: its vocabulary is not known


def test_each_stage_prints_its_size_and_time(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "big.png"
    assert main(["generate", "a large red circle in the center , on a white background", "--steps", "2",
                 "--mode", "sdedit", "--size", "64x64", "--out", str(out)]) == 0  # fmt: skip
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("stage ") and line.endswith(" s")]
    assert [line.split(":")[0] for line in lines] == ["stage 1/2 32x32", "stage 2/2 64x64"]


def test_a_host_budget_larger_than_this_machine_is_refused_before_loading(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out.png"
    assert cli(model, out, "--host-memory", "100000TB") == 2
    error = capsys.readouterr().err
    assert "more than this machine's" in error and "linfusion plan" in error
    assert not out.exists()


def test_an_impossible_size_is_refused_before_any_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100000x100000 is refused before the model loads; 40000x40000 by the planner's analytic lower bound,
    before it traces anything (tracing such sizes used to run for minutes)."""

    def no_trace(*args: object, **kwargs: object) -> None:
        raise AssertionError("traced although the size can never fit")

    monkeypatch.setattr("linfusion.planner.measure.traced_peak", no_trace)
    monkeypatch.setattr("linfusion.planner.measure.traced_flops", no_trace)
    out = tmp_path / "never.png"
    assert main(["generate", "a large red circle", "--size", "100000x100000", "--out", str(out)]) == 2
    assert "image alone needs" in capsys.readouterr().err
    assert main(["generate", "a large red circle", "--size", "40000x40000", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "whatever the savers" in error and "Traceback" not in error
    assert not out.exists()


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> list:
    """Runs stop where the model would load; the list receives what would have run (params, out, source)."""
    from linfusion.app import run as app_run

    calls: list = []

    def run_loaded(params, device, budgets, out, progress, callbacks, source=None, save_stages=None):
        calls.append((params, out, source))
        return out

    monkeypatch.setattr(app_run, "run_loaded", run_loaded)
    monkeypatch.setattr(app_run, "load", lambda *a, **k: pytest.fail("loaded a model"))
    return calls


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "1001", "--scheduler", "euler"], "--steps 1001: at most 500"),
        (["--no-linfusion", "--linfusion", "org/x"], "--no-linfusion and --linfusion org/x contradict"),
        (["--device", "meta"], "device meta holds shapes without values"),
        (["--model", "./nope_dir"], "--model './nope_dir': no such folder"),
        (["--max-memory", "1000TB"], "--max-memory 1024000GB is more than the"),
        (["--out", "/proc/x.png"], "cannot write /proc/x.png"),
    ],
)
def test_hostile_generate_options_are_refused_before_loading(
    no_loading: list, tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    command = ["generate", "a red circle", "--out", str(tmp_path / "x.png"), *argv]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert no_loading == [] and not (tmp_path / "x.png").exists()


def test_save_stages_naming_an_existing_file_is_refused_before_loading(
    no_loading: list, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    stages = tmp_path / "stages"
    stages.write_text("keep")
    assert (
        main(["generate", "a red circle", "--out", str(tmp_path / "x.png"), "--save-stages", str(stages)])
        == 2
    )
    assert "is a file, not a folder" in capsys.readouterr().err and stages.read_text() == "keep"


def test_from_png_replays_a_16k_png_and_refuses_too_many_steps(
    no_loading: list, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from linfusion.app import checks

    monkeypatch.setattr(checks, "check_image_fits", lambda *a: None)  # this machine may be small
    monkeypatch.setattr(checks, "check_free_space", lambda *a: None)
    text = GenerationParams("a cat", width=16384, height=16384, steps=3, scheduler="euler").to_text()
    huge = png_header_only(tmp_path / "huge.png", 16384, 16384, text)
    assert main(["generate", "--from-png", str(huge), "--out", str(tmp_path / "again.png")]) == 0
    ((params, _, _),) = no_loading
    assert (params.width, params.height, params.steps) == (16384, 16384, 3)

    garbage = png_header_only(
        tmp_path / "garbage.png", 64, 64, text.replace("Sampler: euler", "Sampler: garbage")
    )
    assert main(["generate", "--from-png", str(garbage), "--out", str(tmp_path / "g.png")]) == 0
    assert "the PNG's sampler 'garbage' is not one of" in capsys.readouterr().err
    assert no_loading[-1][0].scheduler is None

    many = png_header_only(tmp_path / "many.png", 64, 64, text.replace("Steps: 3", "Steps: 1001"))
    assert main(["generate", "--from-png", str(many), "--out", str(tmp_path / "m.png")]) == 2
    assert "at most 500" in capsys.readouterr().err and len(no_loading) == 2


def test_a_huge_parameters_text_is_cut_in_the_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    png = png_header_only(tmp_path / "big.png", 64, 64, "a cat\nSteps: x, Seed: " + "7" * 1_000_000)
    assert main(["generate", "--from-png", str(png), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert len(err) < 1000 and "more characters" in err


def test_upscale_refuses_to_overwrite_its_source_under_any_path(
    no_loading: list, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(source)
    before = source.read_bytes()
    (tmp_path / "link.png").symlink_to(source)
    for out in (source, tmp_path / "sub" / ".." / "a.png", tmp_path / "link.png"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert main(["upscale", str(source), "--scale", "2", "--out", str(out)]) == 2
        assert "would replace the original" in capsys.readouterr().err
    assert source.read_bytes() == before and no_loading == []


def test_upscale_reads_16_bit_pngs_and_refuses_images_beyond_the_planner(
    no_loading: list, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((64, 64), 30000, dtype=np.uint16), "I;16").save(deep)
    assert main(["upscale", str(deep), "--scale", "2", "--out", str(tmp_path / "x.png")]) == 0
    ((_, _, source),) = no_loading
    assert source.getpixel((0, 0)) == (117, 117, 117)  # 30000 / 257, not white

    huge = png_header_only(tmp_path / "huge.png", 40000, 40000, "x")
    assert main(["upscale", str(huge), "--scale", "2", "--out", str(tmp_path / "y.png")]) == 2
    assert "40000x40000 pixels, more than the 268,435,456" in capsys.readouterr().err


def test_upscale_without_a_prompt_asks_for_what_the_png_records(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model asked for new detail with words it was not trained on can lose what the image shows (the
    bundled models know only their captions' words): the source PNG's own prompt is the better default."""
    source = tmp_path / "source.png"
    assert cli(model, source, "--negative-prompt", "blurry") == 0
    up = ["upscale", str(source), "--scale", "2", "--model", str(model), "--steps", "2"]
    assert main([*up, "--out", str(tmp_path / "recorded.png")]) == 0
    recorded = read_png_parameters(tmp_path / "recorded.png")
    assert (recorded.prompt, recorded.negative_prompt) == ("a red circle", "blurry")
    assert "prompt 'a red circle', as source.png records it" in capsys.readouterr().err
    assert main([*up, "--prompt", "a blue square", "--out", str(tmp_path / "asked.png")]) == 0
    assert read_png_parameters(tmp_path / "asked.png").prompt == "a blue square"
    plain = tmp_path / "plain.png"
    Image.open(source).save(plain)  # the pixels without the parameters text
    assert main([*up, "--out", str(tmp_path / "default.png"), "--quiet"]) == 0
    assert main(["upscale", str(plain), "--scale", "2", "--model", str(model), "--steps", "2", "--quiet",
                 "--out", str(tmp_path / "fallback.png")]) == 0  # fmt: skip
    assert read_png_parameters(tmp_path / "fallback.png").prompt == "high quality, detailed"
