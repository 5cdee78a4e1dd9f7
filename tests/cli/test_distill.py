"""``linfusion distill`` from the command line: data errors, the output folder, resuming, file modes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from linfusion import LinFusion
from linfusion.cli import main
from linfusion.testing import tiny_pipeline, write_image_folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("teacher")
    tiny_pipeline("sd15").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_image_folder(folder, count=4)
    return folder


def distill(teacher: Path, data: Path, output: Path, *extra: str) -> int:
    return main(["distill", "--teacher", str(teacher), "--data", str(data), "--output", str(output),
                 "--resolution", "32", "--batch-size", "2", "--max-steps", "2", "--lr", "1e-3", *extra])  # fmt: skip


def refused_message(capsys: pytest.CaptureFixture, code: int) -> str:
    """Exit 2, and one message on stderr without a traceback."""
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "linfusion distill: " in err
    return err


def test_data_errors_are_one_message_without_a_traceback(
    teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "empty").mkdir()
    err = refused_message(capsys, distill(teacher, tmp_path / "empty", tmp_path / "out"))
    assert "no images found" in err
    write_image_folder(tmp_path / "uncaptioned", count=2, captions=False)
    err = refused_message(capsys, distill(teacher, tmp_path / "uncaptioned", tmp_path / "out"))
    assert "have no caption" in err and "--allow-missing-captions" in err
    err = refused_message(
        capsys, distill(tmp_path / "no-teacher", tmp_path / "uncaptioned", tmp_path / "out")
    )
    assert "no images" not in err  # data is checked first ...
    assert not (tmp_path / "out").exists()


def test_an_output_folder_holding_the_users_files_is_refused_untouched(
    teacher: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "mine"
    output.mkdir()
    own = output / "config.json"
    own.write_text('{"my": "settings"}')
    before = own.stat()
    err = refused_message(capsys, distill(teacher, images, output))
    assert "is not empty and is not a linfusion distill run" in err and "--overwrite" in err
    assert [p.name for p in output.iterdir()] == ["config.json"]
    assert own.read_text() == '{"my": "settings"}' and own.stat().st_mtime_ns == before.st_mtime_ns

    assert distill(teacher, images, output, "--overwrite") == 0  # asked for: the run is written there
    assert "modules_list" in json.loads(own.read_text())


def test_a_finished_run_is_continued_with_resume_or_started_over_with_overwrite(
    teacher: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "run"
    assert distill(teacher, images, output, "--checkpoint-every", "1") == 0
    err = refused_message(capsys, distill(teacher, images, output))
    assert "holds a linfusion distill run already: continue it with --resume" in err
    assert distill(teacher, images, output, "--overwrite", "--max-steps", "1") == 0
    log = [json.loads(line)["step"] for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert log == [1]  # the first run's log and checkpoints are gone, not mixed in
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-000001"]


def test_resuming_after_a_kill_logs_every_step_once_and_files_get_the_umask_mode(
    teacher: Path, images: Path, tmp_path: Path
) -> None:
    output = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        assert distill(teacher, images, output, "--max-steps", "6", "--checkpoint-every", "4") == 0
        first = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
        # A kill after step 6 was logged and before its checkpoint was written: the latest is step 4.
        shutil.rmtree(output / "checkpoints" / "step-000006")
        assert (
            distill(teacher, images, output, "--max-steps", "8", "--checkpoint-every", "4", "--resume") == 0
        )
    finally:
        os.umask(previous)
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, 9))
    assert [entry["loss"] for entry in log[4:6]] == pytest.approx([entry["loss"] for entry in first[4:6]])
    files = [path for path in output.rglob("*") if path.is_file()]
    assert {"config.json", "state.json", "optimizer.pt", "train_log.jsonl"} <= {path.name for path in files}
    modes = {str(path.relative_to(output)): oct(stat.S_IMODE(path.stat().st_mode)) for path in files}
    assert set(modes.values()) == {"0o644"}, modes
    folders = [path for path in output.rglob("*") if path.is_dir()]
    assert {oct(stat.S_IMODE(path.stat().st_mode)) for path in folders} == {"0o755"}
    LinFusion.from_pretrained(output)


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_leaves_no_partial_checkpoint(
    teacher: Path,
    images: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    import torch

    real_save = torch.save

    def save(obj, target, *args, **kwargs) -> None:
        if isinstance(obj, dict) and "param_groups" in obj:  # the optimizer's state, into its file
            target.write(b"PK\x03\x04 the first bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, target, *args, **kwargs)

    usage = SimpleNamespace(total=10**9, used=10**9 - 5 * 2**20, free=5 * 2**20)
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    output = tmp_path / "run"
    err = refused_message(capsys, distill(teacher, images, output))
    written = output / "checkpoints" / ".tmp-step-000002" / "optimizer.pt"
    message = (
        f"linfusion distill: cannot write {written} (No space left on device, 5 MiB free on its disk); "
        "free some space there or write to another disk"
    )
    assert message in err.split("\n") and err.count("linfusion distill:") == 1  # among the progress bars
    left = sorted(str(path.relative_to(output)) for path in output.rglob("*"))
    assert left == ["checkpoints", "distill_config.json", "train_log.jsonl"]  # no partial checkpoint


# ---------------------------------------------------------------- hostile input: refused before any work
def test_data_without_one_readable_image_is_refused_before_the_output_exists(
    teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"")  # empty
    (data / "b.jpg").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a truncated PNG under another name
    for name in ("a", "b"):
        (data / f"{name}.txt").write_text("x")
    err = refused_message(capsys, distill(teacher, data, tmp_path / "out"))
    assert "none of the 2 images" in err and "a.png" in err and "cannot identify image file" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["/proc/linfusion-out", "/proc/linfusion/deeper", "a-file/out"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    teacher: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture, where: str
) -> None:
    (tmp_path / "a-file").write_text("mine")
    output = Path(where) if where.startswith("/") else tmp_path / where
    err = refused_message(capsys, distill(teacher, images, output))
    assert str(output) in err and ("cannot write in" in err or "is a file" in err)
    assert not output.exists() and (tmp_path / "a-file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no probe left behind


def test_teacher_bundled_is_the_bundled_model_and_a_missing_one_creates_nothing(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert distill("bundled", images, tmp_path / "run", "--max-steps", "1", "--batch-size", "1") == 0  # type: ignore[arg-type]
    assert LinFusion.from_pretrained(tmp_path / "run").state_dict()
    for missing in (tmp_path / "nope", "org/not-a-model"):
        err = refused_message(capsys, distill(missing, images, tmp_path / "out"))  # type: ignore[arg-type]
        assert "could not load the teacher" in err or "no such folder" in err
        assert "stacktrace" not in err.lower() and "traceback" not in err.lower()
    assert not (tmp_path / "out").exists()


def test_resume_from_a_missing_checkpoint_creates_nothing(
    teacher: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = refused_message(
        capsys, distill(teacher, images, tmp_path / "out", "--resume", str(tmp_path / "nope"))
    )
    assert "no checkpoint there" in err
    assert not (tmp_path / "out").exists()
    assert distill(teacher, images, tmp_path / "out") == 0  # no --overwrite needed afterwards


@pytest.fixture
def finished_run(teacher: Path, images: Path, tmp_path: Path) -> Path:
    """A 2-step run with a checkpoint after each step."""
    output = tmp_path / "run"
    assert distill(teacher, images, output, "--checkpoint-every", "1") == 0
    return output


def test_resume_refuses_changed_settings_before_touching_the_run(
    teacher: Path, images: Path, finished_run: Path, capsys: pytest.CaptureFixture
) -> None:
    recorded = finished_run / "distill_config.json"
    before = recorded.read_bytes()
    resume = ("--resume", "--max-steps", "3")
    err = refused_message(
        capsys, distill(teacher, images, finished_run, *resume, "--projection-mid-dim", "8")
    )
    assert "--projection-mid-dim 'auto' -> 8" in err and "other model settings" in err
    err = refused_message(
        capsys,
        distill(teacher, images, finished_run, *resume, "--projection-mid-dim", "8", "--allow-config-change"),
    )
    assert "other model settings" in err  # architecture: never, whatever the flag
    err = refused_message(capsys, distill(teacher, images, finished_run, *resume, "--lr", "0.01"))
    assert "--lr 0.001 -> 0.01" in err and "--allow-config-change" in err
    err = refused_message(capsys, distill(teacher, images, finished_run, *resume, "--batch-size", "1"))
    assert "--batch-size 2 -> 1" in err
    assert recorded.read_bytes() == before
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]

    assert distill(teacher, images, finished_run, *resume, "--lr", "0.01", "--allow-config-change") == 0
    assert json.loads(recorded.read_text())["lr"] == 0.01
    # The checkpoint of step 3 records lr 0.01 now; a longer run is free under a constant lr schedule.
    assert distill(teacher, images, finished_run, "--resume", "--max-steps", "4", "--lr", "0.01") == 0
    assert json.loads((finished_run / "checkpoints" / "step-000004" / "state.json").read_text())["step"] == 4


def test_resume_with_no_checkpoint_yet_compares_the_recorded_settings(
    teacher: Path, images: Path, finished_run: Path, capsys: pytest.CaptureFixture
) -> None:
    shutil.rmtree(finished_run / "checkpoints")
    err = refused_message(capsys, distill(teacher, images, finished_run, "--resume", "--lr", "0.5"))
    assert "--lr 0.001 -> 0.5" in err
    assert json.loads((finished_run / "distill_config.json").read_text())["lr"] == 0.001


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("optimizer.pt", b"garbage"),
        ("optimizer.pt", b"\x80\x04\x95garbage"),  # a pickle cut short
        ("lr_scheduler.pt", b""),
        ("rng-0.pt", b"PK\x03\x04"),  # a zip cut short
        ("state.json", b"{bad"),
        ("state.json", b'{"step": 2}'),  # valid JSON, not a checkpoint's
        ("linfusion/diffusion_pytorch_model.safetensors", b"\0" * 9),
    ],
)
def test_a_corrupt_checkpoint_file_is_named_with_what_to_do(
    teacher: Path, images: Path, finished_run: Path, capsys: pytest.CaptureFixture, name: str, content: bytes
) -> None:
    checkpoint = finished_run / "checkpoints" / "step-000002"
    (checkpoint / name).write_bytes(content)
    recorded = (finished_run / "distill_config.json").read_bytes()
    err = refused_message(capsys, distill(teacher, images, finished_run, "--resume", "--max-steps", "3"))
    assert str(checkpoint) in err and "corrupt" in err
    assert f"delete the checkpoint folder {checkpoint}" in err and "step-000001" in err
    assert (finished_run / "distill_config.json").read_bytes() == recorded


@pytest.mark.parametrize("layout", ["txt", "metadata"])
def test_captions_that_are_not_utf8_name_the_file_and_the_byte(
    teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture, layout: str
) -> None:
    data = tmp_path / "data"
    write_image_folder(data, count=2)
    if layout == "txt":
        bad = data / "image_001.txt"
        bad.write_bytes("café au lait".encode("latin-1"))
        offset = 3
    else:
        bad = data / "metadata.jsonl"
        content = b'{"file_name": "image_000.png", "text": "na\xefve"}\n'
        bad.write_bytes(content)
        offset = content.index(b"\xef")
    err = refused_message(capsys, distill(teacher, data, tmp_path / "out"))
    assert str(bad) in err and "not UTF-8" in err and f"byte {offset}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--output", " "], "--output is empty"),
        (["--data", ""], "--data is empty"),
        (["--lr", "nan"], "--lr must be a number > 0"),
        (["--loss-weights", "1,nan,0"], "--loss-weights"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--num-workers", "-1"], "--num-workers must be >= 0"),
        (["--checkpoints-total-limit", "-1"], "--checkpoints-total-limit must be >= 0"),
        (["--lr-warmup-steps", "-3"], "--lr-warmup-steps must be >= 0"),
        (["--lr-scheduler", "bogus"], "--lr-scheduler must be one of"),
        (["--report-to", "bogus"], "--report-to must be one of"),
        (
            ["--validate-every", "1", "--validation-prompts", "x", "--validation-steps", "0"],
            "--validation-steps",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused_before_any_folder_exists(
    teacher: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    err = refused_message(capsys, distill(teacher, images, tmp_path / "out", *flags))
    assert message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data", ["org/not-a-dataset", "fake-saved-dataset", "bad-metadata"])
def test_data_that_is_not_a_dataset_is_one_message(
    teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture, data: str
) -> None:
    if data == "fake-saved-dataset":
        (tmp_path / data).mkdir()
        (tmp_path / data / "dataset_info.json").write_text("{")
    elif data == "bad-metadata":
        write_image_folder(tmp_path / data, count=2)
        (tmp_path / data / "metadata.jsonl").write_text('[1, 2]\n{"file_name": 3}\n')
    source = data if "/" in data else str(tmp_path / data)
    monkeypatch_offline = pytest.MonkeyPatch.context()
    with monkeypatch_offline as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        patch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
        err = refused_message(capsys, distill(teacher, source, tmp_path / "out"))  # type: ignore[arg-type]
    assert repr(source) in err or source in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "broken", ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
)
def test_a_teacher_folder_with_a_broken_file_is_one_message(
    teacher: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture, broken: str
) -> None:
    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    (copy / broken).write_bytes((copy / broken).read_bytes()[:40])
    err = refused_message(capsys, distill(copy, images, tmp_path / "out"))
    assert f"could not load the teacher {str(copy)!r}" in err and "stacktrace" not in err
    assert "needs model_index.json" not in err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_the_wrong_content_or_name_is_refused_with_what_to_do(
    teacher: Path, images: Path, finished_run: Path, capsys: pytest.CaptureFixture
) -> None:
    import torch

    moved = finished_run / "my-checkpoint"
    shutil.move(finished_run / "checkpoints" / "step-000002", moved)
    torch.save({"not": "a random state"}, moved / "rng-0.pt")
    resume = ("--resume", str(moved), "--max-steps", "3")
    err = refused_message(capsys, distill(teacher, images, finished_run, *resume))
    assert f"cannot resume from {moved}" in err and "random state" in err
    (moved / "optimizer.pt").write_bytes(b"")
    err = refused_message(capsys, distill(teacher, images, finished_run, *resume))
    assert f"delete the checkpoint folder {moved} and resume from another checkpoint" in err
    shutil.rmtree(finished_run / "checkpoints" / "step-000001")
    (finished_run / "checkpoints" / "step-000002").mkdir()
    shutil.copytree(moved, finished_run / "checkpoints" / "step-000002", dirs_exist_ok=True)
    err = refused_message(capsys, distill(teacher, images, finished_run, "--resume", "--max-steps", "3"))
    assert "start again (--overwrite instead of --resume)" in err


def test_a_pixart_teacher_distills_and_a_flux_teacher_is_refused_before_loading(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tiny_pipeline("pixart-sigma").save_pretrained(tmp_path / "pixart")
    assert distill(tmp_path / "pixart", images, tmp_path / "out") == 0
    assert "LinFusion weights written to" in capsys.readouterr().out
    assert LinFusion.from_pretrained(tmp_path / "out").modules_dict.keys() == {
        "transformer_blocks.0.attn1",
        "transformer_blocks.1.attn1",
    }
    flux = tmp_path / "flux"  # only its model_index.json: the refusal must come before any weight is read
    flux.mkdir()
    (flux / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]})
    )
    err = refused_message(capsys, distill(flux, images, tmp_path / "refused"))
    assert "LinFusion cannot be mounted on FluxTransformer2DModel: FLUX: its attention is joint" in err
    assert not (tmp_path / "refused").exists()
