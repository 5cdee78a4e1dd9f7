"""Distillation on tiny random teachers: learning, exact resume, latent cache, multi-process, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from linfusion import GeneralizedLinearAttention, LinFusion
from linfusion.distill import DistillConfig, distill
from linfusion.distill.data import DataError
from linfusion.distill.teacher import TeacherError
from linfusion.testing import tiny_pipeline, write_image_folder


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    folders = {}
    for family in ("sd15", "sd21", "sdxl", "pixart-alpha", "pixart-sigma"):
        tiny_pipeline(family).save_pretrained(root / family)
        folders[family] = root / family
    return folders


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_image_folder(folder, count=8)
    return folder


def settings(teacher: Path, data: Path, output: Path, **overrides) -> DistillConfig:
    values = dict(
        teacher=str(teacher), data=str(data), output=str(output), resolution=32, batch_size=2,
        max_steps=6, lr=1e-3, checkpoint_every=3, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return DistillConfig(**values)


def read_log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]


def final_state(output: Path) -> dict[str, torch.Tensor]:
    return LinFusion.from_pretrained(output).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl", "pixart-alpha"])
def test_forty_steps_halve_the_feature_loss(teachers, images, tmp_path: Path, family: str) -> None:
    """Random teachers cannot predict noise, so the noise target would pull the student away from them;
    kd + feature targets agree (both are the teacher) and isolate the distillation signal."""
    output = distill(
        settings(
            teachers[family],
            images,
            tmp_path,
            max_steps=40,
            checkpoint_every=40,
            init="random",
            loss_weights=(0.0, 0.5, 0.5),
        )  # fmt: skip
    )
    features = [entry["feat"] for entry in read_log(output)]
    assert len(features) == 40
    assert np.mean(features[-5:]) <= 0.5 * features[0]


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_default_run_exports_weights_that_mount_and_generate(
    teachers, images, tmp_path: Path, family: str
) -> None:
    output = distill(settings(teachers[family], images, tmp_path))
    log = read_log(output)
    assert [entry["step"] for entry in log] == list(range(1, 7))
    assert all(np.isfinite([e["loss"], e["noise"], e["kd"], e["feat"]]).all() for e in log)
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-000003", "step-000006"]

    pipe = tiny_pipeline(family)
    linfusion = LinFusion.construct_for(pipe, pretrained_model_name_or_path=output)
    assert all(
        isinstance(pipe.unet.get_submodule(p), GeneralizedLinearAttention) for p in linfusion.modules_dict
    )
    image = pipe("a red square", height=32, width=32, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and image.std() > 0.01


@pytest.mark.parametrize("family", ["pixart-alpha", "pixart-sigma"])
def test_pixart_teacher_distills_and_exports_weights_that_mount_and_generate(
    teachers, images, tmp_path: Path, family: str
) -> None:
    output = distill(settings(teachers[family], images, tmp_path, max_steps=2, checkpoint_every=2))
    log = read_log(output)
    assert [entry["step"] for entry in log] == [1, 2]
    assert all(np.isfinite([e["loss"], e["noise"], e["kd"], e["feat"]]).all() for e in log)
    assert all(e["kd"] > 0 and e["feat"] > 0 for e in log)  # the student left the teacher's layers

    config = json.loads((output / "config.json").read_text())
    assert [entry["module_name"] for entry in config["modules_list"]] == [
        "transformer_blocks.0.attn1",
        "transformer_blocks.1.attn1",
    ]
    assert all(entry["bias"] is True for entry in config["modules_list"])
    trained = final_state(output)
    torch.manual_seed(0)  # the run seeds before it builds its layers from the teacher
    initial = LinFusion.from_unet(tiny_pipeline(family).transformer, init="teacher").state_dict()
    assert trained.keys() == initial.keys()
    assert all(not torch.equal(trained[key], initial[key]) for key in initial)

    pipe = tiny_pipeline(family)
    linfusion = LinFusion.construct_for(pipe, pretrained_model_name_or_path=output)
    assert all(
        isinstance(pipe.transformer.get_submodule(p), GeneralizedLinearAttention)
        for p in linfusion.modules_dict
    )
    image = pipe(
        "a red square", height=32, width=32, num_inference_steps=2, output_type="np",
        use_resolution_binning=False, clean_caption=False,
    ).images  # fmt: skip
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and image.std() > 0.01


@pytest.mark.parametrize("family", ["pixart-alpha", "pixart-sigma"])
def test_pixart_run_resumed_after_two_steps_is_bit_identical_to_four_at_once(
    teachers, images, tmp_path: Path, family: str
) -> None:
    common = dict(checkpoint_every=2, caption_dropout=0.5)
    straight = distill(settings(teachers[family], images, tmp_path / "straight", max_steps=4, **common))
    distill(settings(teachers[family], images, tmp_path / "resumed", max_steps=2, **common))
    resumed = distill(
        settings(teachers[family], images, tmp_path / "resumed", max_steps=4, resume="latest", **common)
    )
    expected, actual = final_state(straight), final_state(resumed)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert [e["loss"] for e in read_log(resumed)] == [e["loss"] for e in read_log(straight)]


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(teachers, images, tmp_path: Path) -> None:
    common = dict(max_steps=8, checkpoint_every=4, grad_accum=2, caption_dropout=0.5, random_crop=True)
    straight = distill(settings(teachers["sd15"], images, tmp_path / "straight", **common))

    class Crash(RuntimeError):
        pass

    def crash_at_six(step: int, logs: dict) -> None:  # two steps after the checkpoint of step 4
        if step == 6:
            raise Crash

    with pytest.raises(Crash):
        distill(settings(teachers["sd15"], images, tmp_path / "resumed", **common), callback=crash_at_six)
    assert not (tmp_path / "resumed" / "config.json").exists()  # no export from a crashed run
    assert [e["step"] for e in read_log(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]
    resumed = distill(settings(teachers["sd15"], images, tmp_path / "resumed", resume="latest", **common))
    assert [e["step"] for e in read_log(resumed)] == list(range(1, 9))  # steps 5 and 6 once, not twice

    expected, actual = final_state(straight), final_state(resumed)
    assert expected.keys() == actual.keys()
    assert max((expected[k] - actual[k]).abs().max().item() for k in expected) <= 1e-6
    assert [e["loss"] for e in read_log(resumed)][4:] == pytest.approx(
        [e["loss"] for e in read_log(straight)][4:]
    )


def test_gradient_accumulation_counts_optimizer_steps(teachers, images, tmp_path: Path) -> None:
    output = distill(
        settings(teachers["sd15"], images, tmp_path, max_steps=5, grad_accum=2, checkpoint_every=5)
    )
    state = json.loads((output / "checkpoints" / "step-000005" / "state.json").read_text())
    # 5 optimizer steps x 2 micro-batches = 10 batches of 2; 8 images make 4 batches an epoch.
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (5, 2, 2)


@pytest.mark.parametrize("family", ["sd15", "pixart-alpha"])
def test_latent_cache_gives_the_same_losses(teachers, images, tmp_path: Path, family: str) -> None:
    common = dict(max_steps=4, random_crop=False)
    plain = distill(settings(teachers[family], images, tmp_path / "plain", **common))
    cached = distill(settings(teachers[family], images, tmp_path / "cached", cache_latents=True, **common))
    assert (cached / "latent_cache.pt").exists()
    for a, b in zip(read_log(plain), read_log(cached)):
        for key in ("noise", "kd", "feat"):
            assert a[key] == pytest.approx(b[key], rel=1e-4)


@pytest.mark.parametrize("family", ["sd15", "pixart-sigma"])
def test_gradient_checkpointing_changes_nothing(teachers, images, tmp_path: Path, family: str) -> None:
    plain = distill(settings(teachers[family], images, tmp_path / "plain", max_steps=3))
    checkpointed = distill(
        settings(teachers[family], images, tmp_path / "gc", max_steps=3, gradient_checkpointing=True)
    )
    for a, b in zip(read_log(plain), read_log(checkpointed)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize("family", ["sd15", "pixart-alpha"])
def test_validation_images_are_saved(teachers, images, tmp_path: Path, family: str) -> None:
    output = distill(
        settings(
            teachers[family],
            images,
            tmp_path,
            max_steps=2,
            validate_every=2,
            validation_prompts=["a red square", "a blue square"],
            validation_steps=2,
        )  # fmt: skip
    )
    saved = sorted((output / "validation" / "step-000002").glob("*.png"))
    assert [p.name for p in saved] == ["00.png", "01.png"]
    assert Image.open(saved[0]).size == (32, 32)


def test_metadata_jsonl_and_datasets_inputs(teachers, images, tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "jsonl"
    paths = write_image_folder(folder, count=4, captions=False)
    (folder / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": p.name, "text": f"caption {i}"}) for i, p in enumerate(paths))
    )
    distill(settings(teachers["sd15"], folder, tmp_path / "out-jsonl", max_steps=2))

    rows = {"image": [Image.open(p) for p in paths], "caption": [f"caption {i}" for i in range(4)]}
    dataset = datasets.Dataset.from_dict(
        rows, features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    )
    dataset.save_to_disk(str(tmp_path / "hf"))
    output = distill(
        settings(
            teachers["sd15"], tmp_path / "hf", tmp_path / "out-hf", max_steps=2, caption_column="caption"
        )
    )
    assert len(read_log(output)) == 2
    with pytest.raises(DataError, match="no column 'text'"):
        distill(settings(teachers["sd15"], tmp_path / "hf", tmp_path / "out-bad"))


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "pixart-alpha"])
def test_accelerate_launch_two_processes_on_cpu(teachers, images, tmp_path: Path, family: str) -> None:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "linfusion", "distill", "--teacher", str(teachers[family]), "--data", str(images),
        "--output", str(tmp_path / "out"), "--resolution", "32", "--batch-size", "2", "--max-steps", "3",
        "--checkpoint-every", "3", "--lr", "1e-3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    errors = "\n".join(line for line in result.stderr.splitlines() if "Warn" not in line)
    assert result.returncode == 0, errors[-6000:]
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["num_processes"] == 2
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints" / "step-000003").glob("rng-*.pt")) == [
        "rng-0.pt",
        "rng-1.pt",
    ]
    assert len(read_log(tmp_path / "out")) == 3
    LinFusion.from_pretrained(tmp_path / "out")


# ---------------------------------------------------------------- bad input, all refused before training
def assert_no_training(output: Path) -> None:
    assert not (output / "checkpoints").exists() and not (output / "train_log.jsonl").exists()


def test_missing_and_empty_data_folders(teachers, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        distill(settings(teachers["sd15"], tmp_path / "nowhere", tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        distill(settings(teachers["sd15"], tmp_path / "empty", tmp_path / "out"))
    assert_no_training(tmp_path / "out")


def test_images_without_captions(teachers, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_image_folder(tmp_path / "data", count=4, captions=False)
    with pytest.raises(DataError, match="4 of 4 images .* have no caption.*--allow-missing-captions"):
        distill(settings(teachers["sd15"], tmp_path / "data", tmp_path / "out"))
    assert_no_training(tmp_path / "out")
    output = distill(
        settings(
            teachers["sd15"], tmp_path / "data", tmp_path / "out", max_steps=1, allow_missing_captions=True
        )
    )
    assert "trained with an empty caption" in caplog.text
    assert len(read_log(output)) == 1


def test_corrupt_image_is_skipped_and_counted(teachers, tmp_path: Path) -> None:
    write_image_folder(tmp_path / "data", count=4)
    (tmp_path / "data" / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "data" / "broken.txt").write_text("a broken image")
    output = distill(
        settings(teachers["sd15"], tmp_path / "data", tmp_path / "out", max_steps=6, batch_size=1)
    )
    log = read_log(output)
    assert len(log) == 6 and log[-1]["skipped_images"] >= 1


def test_teacher_that_is_not_a_stable_diffusion_pipeline(images, tmp_path: Path) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=8, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(
        TeacherError, match="not a Stable Diffusion pipeline: it has no vae, text_encoder, tokenizer"
    ):
        distill(settings(tmp_path / "ddpm", images, tmp_path / "out"))
    unet.save_pretrained(tmp_path / "just-a-unet")
    with pytest.raises(TeacherError, match="could not load the teacher"):
        distill(settings(tmp_path / "just-a-unet", images, tmp_path / "out"))
    assert_no_training(tmp_path / "out")


def tiny_sd3_pipeline() -> Any:
    """A Stable Diffusion 3 pipeline (joint attention) with a tiny transformer and no text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from linfusion.testing.tiny import tiny_vae

    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
    )  # fmt: skip
    nothing = dict.fromkeys(
        ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), **nothing
    )


def tiny_sana_pipeline() -> Any:
    """A SANA pipeline (already linear attention) with a tiny transformer and nothing else that loads."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8,
    )  # fmt: skip
    return SanaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def test_teachers_that_cannot_be_linearized_are_refused_before_any_work(
    images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import DiffusionPipeline

    from linfusion.distill.teacher import check_teacher

    tiny_sd3_pipeline().save_pretrained(tmp_path / "sd3")
    pixart = tiny_pipeline("pixart-sigma")
    pixart.register_modules(transformer=None)
    pixart.save_pretrained(tmp_path / "no-transformer")

    def no_loading(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_loading)
    with pytest.raises(
        TeacherError, match="SD3Transformer2DModel: Stable Diffusion 3: its attention is joint"
    ):
        distill(settings(tmp_path / "sd3", images, tmp_path / "out"))
    with pytest.raises(TeacherError, match="PixArtSigmaPipeline without its transformer"):
        distill(settings(tmp_path / "no-transformer", images, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    # A pipeline already loaded (or from the Hub) is refused by the registry's check, with its reason.
    with pytest.raises(TeacherError, match="cannot be mounted on SD3Transformer2DModel: Stable Diffusion 3"):
        check_teacher(tiny_sd3_pipeline(), "sd3")
    with pytest.raises(TeacherError, match="not a complete PixArt pipeline: it has no transformer"):
        check_teacher(pixart, "pixart")
    with pytest.raises(
        TeacherError, match="SanaTransformer2DModel: SANA: its self-attention is already linear"
    ):
        check_teacher(tiny_sana_pipeline(), "sana")


def test_bad_settings_are_refused_up_front(teachers, images, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        settings(teachers["sd15"], images, tmp_path, resolution=500)
    with pytest.raises(ValueError, match="loss-weights"):
        settings(teachers["sd15"], images, tmp_path, loss_weights=(1.0, -1.0, 0.0))
    with pytest.raises(ValueError, match="--validate-every needs --validation-prompts"):
        settings(teachers["sd15"], images, tmp_path, validate_every=5)
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        distill(settings(teachers["sd15"], images, tmp_path, mixed_precision="fp16"))
    with pytest.raises(ValueError, match="fewer than one batch"):
        distill(settings(teachers["sd15"], images, tmp_path, batch_size=16))
    assert_no_training(tmp_path)


def test_cli_runs_and_reports_bad_resolution(teachers, images, tmp_path: Path, capsys) -> None:
    from linfusion.cli import main

    arguments = ["distill", "--teacher", str(teachers["sd15"]), "--data", str(images), "--output", str(tmp_path),
                 "--resolution", "32", "--batch-size", "2", "--max-steps", "2", "--loss-weights", "1,0.5,0.25"]  # fmt: skip
    assert main(arguments) == 0
    assert json.loads((tmp_path / "distill_config.json").read_text())["loss_weights"] == [1.0, 0.5, 0.25]
    assert "LinFusion weights written to" in capsys.readouterr().out
    assert main([*arguments[:7], "--resolution", "30"]) == 2
    err = capsys.readouterr().err
    assert "multiple of 8" in err and "Traceback" not in err


def test_teacher_initialization_starts_close_to_the_teacher(teachers, images, tmp_path: Path) -> None:
    first_feature_loss = {}
    for init in ("teacher", "random"):
        output = distill(settings(teachers["sd15"], images, tmp_path / init, max_steps=1, init=init))
        first_feature_loss[init] = read_log(output)[0]["feat"]
    assert first_feature_loss["teacher"] < 0.1 * first_feature_loss["random"], first_feature_loss


def test_bf16_mixed_precision_keeps_fp32_master_weights(teachers, images, tmp_path: Path) -> None:
    output = distill(settings(teachers["sdxl"], images, tmp_path, max_steps=3, mixed_precision="bf16"))
    log = read_log(output)
    assert all(np.isfinite([e["loss"], e["feat"]]).all() for e in log)
    assert {t.dtype for t in final_state(output).values()} == {torch.float32}


def test_an_unreadable_image_is_warned_about_once_not_once_per_epoch(
    teachers, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_image_folder(tmp_path / "data", count=3)
    (tmp_path / "data" / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "data" / "broken.txt").write_text("a broken image")
    distill(settings(teachers["sd15"], tmp_path / "data", tmp_path / "out", max_steps=12, batch_size=1))
    assert read_log(tmp_path / "out")[-1]["skipped_images"] >= 2  # seen in several of the 4 epochs
    assert caplog.text.count("skipping unreadable image") == 1 and "broken.png" in caplog.text


def test_data_that_becomes_unreadable_during_the_run_stops_it_instead_of_looping(
    teachers, tmp_path: Path
) -> None:
    from linfusion.distill import Distiller

    images = write_image_folder(tmp_path / "data", count=2)
    distiller = Distiller(settings(teachers["sd15"], tmp_path / "data", tmp_path / "out", batch_size=1))
    for image in images:
        Path(image).write_bytes(b"gone")
    with pytest.raises(DataError, match="none of the 2 images .* can be read any more"):
        distiller.run()


@pytest.mark.parametrize("where", ["between steps", "while writing a checkpoint"])
def test_ctrl_c_leaves_no_half_written_checkpoint_and_the_resumed_run_is_bit_identical(
    teachers, images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    common = dict(max_steps=4, checkpoint_every=2, caption_dropout=0.5)
    straight = distill(settings(teachers["sd15"], images, tmp_path / "straight", **common))
    output = tmp_path / "interrupted"

    def ctrl_c_at_three(step: int, logs: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    callback = None
    if where == "between steps":
        callback = ctrl_c_at_three
    else:  # during the checkpoint of step 4, after its weights are written
        from linfusion.distill import trainer

        real_save = trainer.torch_save

        def save(obj, target):
            if Path(target).name == "optimizer.pt" and "step-000004" in str(target):
                raise KeyboardInterrupt
            return real_save(obj, target)

        monkeypatch.setattr(trainer, "torch_save", save)
    with pytest.raises(KeyboardInterrupt):
        distill(settings(teachers["sd15"], images, output, **common), callback=callback)
    monkeypatch.undo()
    checkpoints = output / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]  # no .tmp-, no partial step 4
    assert not (output / "config.json").exists()

    distill(settings(teachers["sd15"], images, output, resume="latest", **common))
    expected, actual = final_state(straight), final_state(output)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert [e["loss"] for e in read_log(output)] == [e["loss"] for e in read_log(straight)]


def test_a_corrupt_latent_cache_is_rebuilt(teachers, images, tmp_path: Path, caplog) -> None:
    common = dict(max_steps=2, random_crop=False, cache_latents=True)
    first = read_log(distill(settings(teachers["sd15"], images, tmp_path / "run", **common)))
    cache = tmp_path / "run" / "latent_cache.pt"
    cache.write_bytes(cache.read_bytes()[:100])  # cut short
    again = read_log(distill(settings(teachers["sd15"], images, tmp_path / "run", overwrite=True, **common)))
    assert "rebuilding the unreadable latent cache" in caplog.text
    assert [e["loss"] for e in again] == [e["loss"] for e in first]
    torch.load(cache, weights_only=False)  # whole again


def test_resume_compares_folders_not_spellings(teachers, images, tmp_path: Path, monkeypatch) -> None:
    from linfusion.distill.config import DistillConfigError

    distill(settings(teachers["sd15"], images, tmp_path / "run", max_steps=1, checkpoint_every=1))
    monkeypatch.chdir(teachers["sd15"].parent)
    same = settings(Path(teachers["sd15"].name), images, tmp_path / "run", max_steps=2, resume="latest")
    distill(same)  # the teacher named relative to another working directory: the same folder
    assert len(read_log(tmp_path / "run")) == 2
    other = settings(teachers["sd21"], images, tmp_path / "run", max_steps=3, resume="latest")
    with pytest.raises(DistillConfigError, match="other model settings .*--teacher"):
        distill(other)
