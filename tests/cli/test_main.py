"""The command line as a user meets it, in a fresh process: what it prints with --quiet, by default, and with -v."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

THIRD_PARTY_NOTICES = (
    "[transformers]",
    "FutureWarning",
    "should be kept in float32",
    "Loading pipeline components",
)


def linfusion(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("DIFFUSERS_VERBOSITY", None)  # set by the tests' conftest; a user's shell has neither
    env.pop("TRANSFORMERS_VERBOSITY", None)
    command = [sys.executable, "-m", "linfusion", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_quiet_prints_the_path_only_the_default_no_third_party_notices_and_verbose_everything(
    tmp_path: Path,
) -> None:
    argv = ["generate", "a small red circle on the left , on a gray background", "--steps", "2", "--out"]
    quiet = linfusion(*argv, str(tmp_path / "quiet.png"), "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == f"{tmp_path / 'quiet.png'}\n" and quiet.stderr == ""

    default = linfusion(*argv, str(tmp_path / "default.png"))
    assert default.returncode == 0, default.stderr
    assert not [notice for notice in THIRD_PARTY_NOTICES if notice in default.stderr], default.stderr
    assert "memory plan" in default.stderr and "generate: 100%" in default.stderr  # ours stay
    assert "stage 1/1 32x32: " in default.stderr

    verbose = linfusion(*argv, str(tmp_path / "verbose.png"), "-v")
    assert verbose.returncode == 0, verbose.stderr
    shown = [notice for notice in THIRD_PARTY_NOTICES if notice in verbose.stderr]
    assert shown, verbose.stderr  # whichever of them this environment's libraries emit
    assert len(verbose.stderr.splitlines()) > len(default.stderr.splitlines())


class FailingStream:
    """A standard output whose reader went away (EPIPE) or whose disk is full (ENOSPC)."""

    def __init__(self, code: int) -> None:
        self.code = code

    def write(self, text: str) -> int:
        raise OSError(self.code, os.strerror(self.code))

    def flush(self) -> None:
        raise OSError(self.code, os.strerror(self.code))


def plan_in_process(monkeypatch: pytest.MonkeyPatch, make_plan) -> None:
    from linfusion.app import plan as app_plan

    monkeypatch.setattr(app_plan, "make_plan", make_plan)


def test_ctrl_c_is_one_line_and_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from linfusion.cli import main

    def interrupted(request):
        raise KeyboardInterrupt

    plan_in_process(monkeypatch, interrupted)
    assert main(["plan", "--size", "64x64", "--device", "cpu", "--max-memory", "1GB"]) == 130
    err = capsys.readouterr().err
    assert err == "linfusion plan: interrupted\n"


@pytest.mark.parametrize(("code", "status", "message"), [
    (errno.EPIPE, 141, ""),
    (errno.ENOSPC, 1, "linfusion plan: cannot write to standard output: No space left on device\n"),
])  # fmt: skip
def test_a_closed_or_full_stdout_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, code: int, status: int, message: str
) -> None:
    from types import SimpleNamespace

    from linfusion.cli import main

    planned = SimpleNamespace(describe=lambda: "the plan", plan=SimpleNamespace(fits=True))
    plan_in_process(monkeypatch, lambda request: planned)
    monkeypatch.setattr(sys, "stdout", FailingStream(code))
    assert main(["plan", "--size", "64x64", "--device", "cpu", "--max-memory", "1GB"]) == status
    assert capsys.readouterr().err == message


@pytest.mark.parametrize(("error", "status", "message"), [
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/data/out.json"), 2,
     "linfusion plan: cannot write /data/out.json (Disk quota exceeded); free some space there or write to "
     "another disk\n"),
    (OSError(errno.EACCES, "Permission denied", "/data/out.json"), 1,
     "linfusion plan: internal error: PermissionError: [Errno 13] Permission denied: '/data/out.json' "
     "(run with -v for the traceback; please report it)\n"),
])  # fmt: skip
def test_a_full_disk_is_the_users_to_fix_and_other_os_errors_stay_bugs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, error: OSError, status: int, message: str
) -> None:
    from linfusion.cli import main

    def failing(request):
        raise error

    plan_in_process(monkeypatch, failing)
    assert main(["plan", "--size", "64x64", "--device", "cpu", "--max-memory", "1GB"]) == status
    assert capsys.readouterr().err == message


@pytest.mark.slow
@pytest.mark.multiprocess
def test_plan_into_a_closed_pipe_or_dev_full_in_a_shell(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    plan = f"{sys.executable} -m linfusion plan --size 64x64 --device cpu --max-memory 12GB --json"
    piped = subprocess.run(
        ["bash", "-c", f"{plan} | true; echo status=${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert "Traceback" not in piped.stderr and piped.stdout.strip() in ("status=141", "status=0"), piped
    full = subprocess.run(["bash", "-c", f"{plan} > /dev/full"], capture_output=True, text=True, env=env)
    assert full.returncode == 1
    assert full.stderr == "linfusion plan: cannot write to standard output: No space left on device\n"
