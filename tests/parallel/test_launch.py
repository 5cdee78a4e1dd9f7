"""``torchrun -m linfusion generate``: the PNG equals the single-process PNG; a failing rank stops all ranks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import linfusion
from linfusion import LinFusion
from linfusion.cli import main
from linfusion.testing import tiny_pipeline
from linfusion.testing.parallel import free_port

pytestmark = [pytest.mark.multiprocess]

SOURCE = str(Path(linfusion.__file__).resolve().parents[1])
DRIVER = str(Path(__file__).parents[1] / "support" / "fail_driver.py")
ARGS = ["a red circle", "--steps", "2", "--quiet", "--guidance", "5"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD pipeline folder with LinFusion weights in ``linfusion/`` (random, not the teacher's)."""
    folder = tmp_path_factory.mktemp("model")
    pipe = tiny_pipeline("sd15")
    pipe.save_pretrained(folder)
    LinFusion.from_unet(pipe.unet, init="random").save_pretrained(folder / "linfusion")
    return folder


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        PYTHONPATH=os.pathsep.join([SOURCE, env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        LINFUSION_DIST_TIMEOUT="30",
        **extra,
    )
    return env


def _torchrun(processes: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.run(
        [*command, "-m", "linfusion", "generate", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.parametrize(
    ("processes", "extra"),
    [
        (2, ["--size", "32x48"]),
        (2, ["--mode", "sdedit", "--size", "64x64", "--scheduler", "euler-a"]),
        (2, ["--mode", "demofusion", "--size", "64x64"]),  # dilated convs and the blur across stripes
    ],
    ids=["plain", "sdedit", "demofusion"],
)
def test_torchrun_writes_the_single_process_png(
    model: Path, tmp_path: Path, processes: int, extra: list
) -> None:
    single, parallel = tmp_path / "single.png", tmp_path / "parallel.png"
    assert main(["generate", *ARGS, "--model", str(model), "--out", str(single), *extra]) == 0
    done = _torchrun(processes, *ARGS, "--model", str(model), "--out", str(parallel), *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(str(parallel)) == 1  # rank 0 only (--quiet: the path alone)
    difference = np.abs(_pixels(single).astype(int) - _pixels(parallel).astype(int))
    if "--mode" not in extra:
        assert difference.max() == 0  # the same PNG
    else:
        # Two stages, each rounded to 8-bit between them: a float difference of ~1e-6 (summation order)
        # can flip the rounding of a few values (measured: 2 of 12,288 by 1 level), never more.
        # DemoFusion renormalizes by standard deviations (blur, anchor) and decodes/re-encodes: measured
        # 0.9 % of values 1 level off, never more; its UNet pass itself is exact (tests/parallel/test_exact.py).
        assert difference.max() <= 1 and (difference > 0).mean() < (0.02 if "demofusion" in extra else 1e-3)
    assert Image.open(single).info["parameters"] == Image.open(parallel).info["parameters"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallel.png", "single.png"]


@pytest.mark.parametrize("fail_call", [1, 0], ids=["in-the-unet", "while-loading"])
def test_a_failing_rank_stops_every_rank(model: Path, tmp_path: Path, fail_call: int) -> None:
    """Ranks started by hand (no torchrun agent to kill the others): our own error path must stop them."""
    port = str(free_port())
    out = tmp_path / "never.png"
    started = time.monotonic()
    ranks = [
        subprocess.Popen(
            [sys.executable, DRIVER, "generate", *ARGS, "--model", str(model), "--out", str(out)],
            env=_env(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                LINFUSION_TEST_FAIL_RANK="1",
                LINFUSION_TEST_FAIL_CALL=str(fail_call),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    errors = [process.communicate(timeout=90)[1] for process in ranks]
    elapsed = time.monotonic() - started
    assert [process.returncode for process in ranks] == [1, 1], errors
    assert elapsed < 60  # well under the 30 s collective timeout plus start-up: nobody waited for it
    assert "linfusion (rank 1 of 2): RuntimeError: injected failure" in errors[1]
    assert "linfusion (rank 0 of 2)" in errors[0] and "failed" in errors[0]
    assert not out.exists()


def test_torchrun_with_the_bundled_model_writes_the_single_process_png(tmp_path: Path) -> None:
    """The default model (the bundled one, LinFusion mounted): 2 processes give the same PNG as 1."""
    args = [
        "a large red circle on the left , on a gray background",
        "--steps",
        "8",
        "--guidance",
        "4",
        "--quiet",
    ]
    single, parallel = tmp_path / "single.png", tmp_path / "parallel.png"
    assert main(["generate", *args, "--out", str(single)]) == 0
    done = _torchrun(2, *args, "--out", str(parallel))
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.array_equal(_pixels(single), _pixels(parallel))
    assert _pixels(single).std() > 10  # a real picture, not a blank one
