"""Files written completely or not at all, with the mode the umask gives; sizes read and shown one way."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from linfusion.io import (
    atomic_file,
    atomic_folder,
    atomic_write_text,
    disk_full_behind,
    disk_full_message,
    format_size,
    parse_size,
    probe_writable,
    size_flag,
    torch_save,
    umask_mode_for_new_files,
)


def test_parse_size() -> None:
    assert parse_size("24GB") == parse_size("24GiB") == parse_size("24g") == 24 * 2**30
    assert parse_size("512MB") == 512 * 2**20 and parse_size(1000) == 1000
    with pytest.raises(ValueError, match="cannot read memory size"):
        parse_size("lots")


def test_size_formatting() -> None:
    assert format_size(1.5 * 2**30) == "1.50 GiB" and format_size(300 * 2**20) == "300 MiB"
    assert size_flag(2**30 + 1) == "1.1GB" and size_flag(5 * 2**20 + 1) == "6MB"
    assert parse_size(size_flag(123_456_789_012)) >= 123_456_789_012


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_new_and_replaced_files_get_the_umask_mode(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        target = tmp_path / "out.txt"
        atomic_write_text(target, "first")
        assert mode_of(target) == 0o666 & ~umask
        target.chmod(0o600)
        atomic_write_text(target, "second")  # replacing: the umask's mode again, not the temporary's 0600
        assert target.read_text() == "second" and mode_of(target) == 0o666 & ~umask
        with atomic_folder(tmp_path / "folder") as folder:
            (folder / "a").write_text("a")
        assert mode_of(tmp_path / "folder") == 0o777 & ~umask
    finally:
        os.umask(previous)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_file(target, "w") as handle:
        handle.write("half of the new")
        raise RuntimeError("disk on fire")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_a_full_disk_names_the_file_asked_for_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out" / "x.png"
    target.parent.mkdir()
    with pytest.raises(OSError) as full, atomic_file(target) as handle:
        handle.write(b"half of the image")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert full.value.filename == str(target) and list(target.parent.iterdir()) == []

    usage = SimpleNamespace(total=10**9, used=10**9 - 3 * 2**20, free=3 * 2**20)
    asked = []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: asked.append(Path(path)) or usage)
    assert disk_full_message(full.value) == (
        f"cannot write {target} (No space left on device, 3 MiB free on its disk); "
        "free some space there or write to another disk"
    )
    assert asked == [target.parent]  # the file is not there: its nearest existing folder is asked
    quota = OSError(errno.EDQUOT, "Disk quota exceeded", str(target))
    assert disk_full_message(quota) == (  # the disk's free space says nothing of a quota
        f"cannot write {target} (Disk quota exceeded); free some space there or write to another disk"
    )
    assert disk_full_message(OSError(errno.ENOSPC, "No space left on device")) == (
        "an output could not be written: No space left on device; free some space or write to another disk"
    )


class FullDisk:
    """A file with ``room`` bytes left on its disk: a longer write fails with ENOSPC, as the kernel's does."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def test_a_full_disk_under_torch_save_is_the_os_error_not_torchs_writer_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *args, **kwargs: FullDisk(real_fdopen(*args, **kwargs), 4096))
    target = tmp_path / "optimizer.pt"
    with pytest.raises(OSError) as full:  # torch's zip writer raises a RuntimeError over it on the way out
        torch_save({"state": torch.zeros(100_000)}, target)
    assert (full.value.errno, full.value.filename) == (errno.ENOSPC, str(target))
    assert list(tmp_path.iterdir()) == []


def test_the_full_disk_behind_an_error_is_found_and_nothing_else() -> None:
    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    found = disk_full_behind(rust, "/out/weights")
    assert found is not None and (found.errno, found.filename) == (errno.ENOSPC, "/out/weights")
    quota = disk_full_behind(OSError(errno.EDQUOT, "Disk quota exceeded"), Path("/out/x.png"))
    assert quota is not None and (quota.errno, quota.filename) == (errno.EDQUOT, "/out/x.png")
    assert disk_full_behind(RuntimeError("I/O error: Permission denied (os error 13)"), "/out") is None
    assert disk_full_behind(OSError(errno.EACCES, "Permission denied"), "/out") is None
    assert disk_full_behind(KeyboardInterrupt(), "/out") is None


def test_the_write_probe_names_the_folder_it_tried_and_leaves_nothing(tmp_path: Path) -> None:
    assert probe_writable(tmp_path) == tmp_path
    assert probe_writable(tmp_path / "new" / "deeper") == tmp_path  # the nearest existing parent
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(NotADirectoryError) as refused:
        probe_writable(tmp_path / "a-file" / "out")
    assert refused.value.filename == str(tmp_path / "a-file")
    with pytest.raises(OSError) as refused:  # root passes os.access here, yet cannot write
        probe_writable("/proc/linfusion-out")
    assert refused.value.filename == "/proc" and not isinstance(refused.value, NotADirectoryError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_folder_is_swapped_in_only_when_complete(tmp_path: Path) -> None:
    final = tmp_path / "run"
    with atomic_folder(final) as folder:
        (folder / "state.json").write_text("1")
    with pytest.raises(RuntimeError), atomic_folder(final) as folder:
        (folder / "state.json").write_text("2")
        raise RuntimeError("killed")
    assert (final / "state.json").read_text() == "1"
    with atomic_folder(final) as folder:
        (folder / "state.json").write_text("3")
    assert (final / "state.json").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_files_a_private_writer_creates_or_replaces_get_the_umask_mode(tmp_path: Path) -> None:
    """safetensors' save_file (behind save_pretrained) writes 0600 whatever the umask."""
    import numpy as np
    from safetensors.numpy import save_file

    untouched = tmp_path / "notes.txt"
    untouched.write_text("mine")
    untouched.chmod(0o600)
    previous = os.umask(0o022)
    try:
        with umask_mode_for_new_files(tmp_path):
            save_file({"w": np.zeros(2, dtype=np.float32)}, str(tmp_path / "weights.safetensors"))
            (tmp_path / "sub").mkdir()
            save_file({"w": np.zeros(2, dtype=np.float32)}, str(tmp_path / "sub" / "more.safetensors"))
    finally:
        os.umask(previous)
    assert mode_of(tmp_path / "weights.safetensors") == 0o644
    assert mode_of(tmp_path / "sub" / "more.safetensors") == 0o644
    assert mode_of(untouched) == 0o600  # not written in the block: left alone


def test_size_flags_are_plain_numbers_even_for_huge_sizes() -> None:
    assert size_flag(1000 * 2**40) == "1024000GB" and size_flag(24 * 2**30) == "24GB"
    assert parse_size(size_flag(1000 * 2**40)) == 1000 * 2**40
