"""The command line as a user meets it, in a fresh process: what it prints with --quiet, by default, and with -v."""

from __future__ import annotations

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
