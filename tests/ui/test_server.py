"""``linfusion ui`` on the command line: safe defaults, clear refusals before serving anything.

That ``linfusion ui --help`` imports neither torch nor Gradio is checked in ``tests/test_architecture.py``.
"""

from __future__ import annotations

import socket
import sys

import pytest

from linfusion.cli import build_parser, main


def test_ui_is_a_sub_command_with_safe_defaults() -> None:
    args = build_parser().parse_args(["ui"])
    assert (args.host, args.port, args.model, args.outputs, args.device) == (
        "127.0.0.1",
        7860,
        None,
        "outputs",
        "auto",
    )
    several = build_parser().parse_args(["ui", "--model", "bundled", "some/model", "--model", "/models/x"])
    assert several.model == ["bundled", "some/model", "/models/x"]


def test_another_host_is_warned_about(capsys: pytest.CaptureFixture, tmp_path) -> None:
    # the model cannot load, so nothing is ever served on 0.0.0.0
    assert main(["ui", "--host", "0.0.0.0", "--model", "/no/such/model", "--outputs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0, not on this machine only" in err and "there is no login" in err
    assert "could not load the model from '/no/such/model'" in err


def test_bad_port_busy_port_and_missing_gradio_are_refused(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    assert main(["ui", "--port", "70000"]) == 2
    assert "--port 70000 is not a port number" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port), "--outputs", str(tmp_path / "out")]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["ui", "--device", "warp", "--outputs", str(tmp_path / "out")]) == 2
    assert "--device warp: " in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the ui extra were not installed
    assert main(["ui", "--outputs", str(tmp_path / "out")]) == 2
    assert "the page needs Gradio: pip install 'linfusion[ui]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--threads", "-1"], "--threads -1: pass a number of CPU threads >= 1"),
        (["--threads", "0"], "--threads 0: pass a number of CPU threads >= 1"),
        (["--max-upload-mb", "-5"], "--max-upload-mb -5.0: pass a size in MB > 0"),
        (["--max-upload-mb", "nan"], "--max-upload-mb nan: pass a size in MB > 0"),
        (["--max-upload-mb", "inf"], "--max-upload-mb inf: pass a size in MB > 0"),
    ],
)
def test_bad_counts_are_refused_before_anything_loads(
    capsys: pytest.CaptureFixture, tmp_path, argv: list[str], message: str
) -> None:
    assert main(["ui", "--outputs", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_outputs_naming_a_file_says_so(capsys: pytest.CaptureFixture, tmp_path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["ui", "--outputs", str(afile)]) == 2
    assert f"--outputs {afile} is a file, not a folder" in capsys.readouterr().err
    assert afile.read_text() == "mine"


def test_outputs_that_cannot_be_written_are_refused_before_anything_loads(
    capsys: pytest.CaptureFixture,
) -> None:
    assert main(["ui", "--outputs", "/proc"]) == 2  # root passes os.access there, yet cannot write
    err = capsys.readouterr().err
    assert "the outputs folder /proc is not writable" in err and "Traceback" not in err


def test_gradios_files_stay_under_the_outputs_folder_and_go_at_exit(tmp_path, monkeypatch) -> None:
    import os

    from linfusion.ui.server import gradio_temporary_folder

    monkeypatch.setenv("GRADIO_TEMP_DIR", "/somewhere/else")
    with gradio_temporary_folder(tmp_path) as folder:
        assert folder.parent == tmp_path and os.environ["GRADIO_TEMP_DIR"] == str(folder)
        import gradio.utils

        assert gradio.utils.get_upload_folder() == str(folder)  # where Gradio puts uploads and results
        (folder / "upload.png").write_bytes(b"x")
    assert not folder.exists() and os.environ["GRADIO_TEMP_DIR"] == "/somewhere/else"
    with pytest.raises(RuntimeError), gradio_temporary_folder(tmp_path) as second:
        raise RuntimeError("the server failed")
    assert not second.exists()
