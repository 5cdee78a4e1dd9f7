"""The checks before anything loads: each hostile request is refused with what to do, and nothing is written."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from linfusion.app import checks
from linfusion.app.checks import (
    check_device_budget,
    check_free_space,
    check_not_source,
    check_save_stages,
    check_writable,
    machine_memory,
    preflight,
)
from linfusion.app.loading import check_model_exists, resolve_device
from linfusion.app.params import GenerationError, GenerationParams
from linfusion.app.prepare import Budgets


def test_a_device_this_machine_lacks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GenerationError, match="no CUDA GPU that torch can use; use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(GenerationError, match="no CUDA GPU"):
        resolve_device("cuda:1")
    with pytest.raises(GenerationError, match="device meta holds shapes without values"):
        resolve_device("meta")
    with pytest.raises(GenerationError, match="unknown device 'warp'"):
        resolve_device("warp")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(GenerationError, match="has 2 CUDA GPU"):
        resolve_device("cuda:2")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(GenerationError, match="this machine has no mps device"):
        resolve_device("mps")


def test_an_upscale_scale_that_is_not_a_number_is_refused() -> None:
    from linfusion.app.prepare import upscale_params

    for scale in ("2", None, True):
        with pytest.raises(GenerationError, match="--scale must be a number > 1"):
            upscale_params(GenerationParams("a cat"), (64, 64), scale)


def test_outputs_in_places_that_cannot_be_written_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GenerationError, match="cannot write /proc/x.png"):
        check_writable(Path("/proc/x.png"))
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    with pytest.raises(GenerationError, match="cannot create folder"):
        check_writable(blocker / "x.png")
    check_writable(tmp_path / "new" / "x.png")
    assert list((tmp_path / "new").iterdir()) == []  # the probe file is gone


def test_save_stages_naming_a_file_is_refused(tmp_path: Path) -> None:
    existing = tmp_path / "stages.txt"
    existing.write_text("keep me")
    with pytest.raises(GenerationError, match="is a file, not a folder"):
        check_save_stages(existing)
    assert existing.read_text() == "keep me"
    check_save_stages(tmp_path / "stages")
    assert (tmp_path / "stages").is_dir()


def test_a_disk_too_full_for_the_png_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = SimpleNamespace(total=10**9, used=10**9 - 3_000_000, free=3_000_000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    check_free_space(tmp_path / "x.png", 1000, 1000)  # 3 MB: just fits
    with pytest.raises(GenerationError, match="may take up to .* free some space"):
        check_free_space(tmp_path / "x.png", 1000, 1008)


def test_the_source_image_is_never_the_output(tmp_path: Path) -> None:
    source = tmp_path / "a.png"
    source.write_bytes(b"original")
    (tmp_path / "link.png").symlink_to(source)
    for out in (source, tmp_path / "." / "a.png", tmp_path / "link.png"):
        with pytest.raises(GenerationError, match="would replace the original"):
            check_not_source(out, source)
    check_not_source(tmp_path / "b.png", source)


def test_budgets_above_this_machine_are_refused() -> None:
    with pytest.raises(GenerationError, match="--max-memory .* is more than the .* of this cpu"):
        check_device_budget(machine_memory() + 2**30, torch.device("cpu"))
    check_device_budget(machine_memory() // 2, torch.device("cpu"))


def test_a_model_path_that_does_not_exist_says_so(tmp_path: Path) -> None:
    for model in ("./nope_dir", "../nope/dir", str(tmp_path / "nope")):
        with pytest.raises(GenerationError, match="no such folder"):
            check_model_exists(model)
    check_model_exists("org/model")  # a Hub id: the Hub answers later
    check_model_exists("bundled")


def test_preflight_refuses_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = GenerationParams("a cat", width=64, height=64)
    out = tmp_path / "x.png"
    with pytest.raises(GenerationError, match="--steps 1001: at most 500"):
        preflight(params.replace(steps=1001), out, "cpu", Budgets())
    with pytest.raises(GenerationError, match="is more than the"):
        preflight(params, out, "cpu", Budgets(device=machine_memory() * 2))
    monkeypatch.setattr(checks, "check_free_space", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "x")))
    with pytest.raises(OSError):  # preflight does run the disk check
        preflight(params, out, "cpu", Budgets())
    assert not out.exists() and os.listdir(tmp_path) == []


def test_the_python_api_refuses_a_request_that_is_not_generation_params(tmp_path: Path) -> None:
    import linfusion

    for request in ("a cat", ["a cat"], None):
        with pytest.raises(GenerationError, match="the request must be a GenerationParams"):
            linfusion.generate(request, tmp_path / "x.png")
    with pytest.raises(GenerationError, match="prompt must be text"):
        linfusion.generate(GenerationParams(123), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_a_gpu_budget_above_the_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    properties = SimpleNamespace(total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    with pytest.raises(GenerationError, match="--max-memory 81GB is more than the 80.00 GiB of this cuda"):
        check_device_budget(81 * 2**30, torch.device("cuda", 0))
    check_device_budget(80 * 2**30, torch.device("cuda", 0))
