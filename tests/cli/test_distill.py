"""``linfusion distill`` from the command line: data errors, the output folder, resuming, file modes."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

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
