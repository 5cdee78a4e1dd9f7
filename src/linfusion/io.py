"""Files written the way users expect, and byte sizes read and shown one way.

Every file the package writes (images, weights, checkpoints, logs, benchmark results) goes through
:func:`atomic_file` or :func:`atomic_folder`: the content is written to a temporary sibling and renamed
over the target only once complete, so a crash or a kill never leaves half a file. The result gets the
permissions the process umask gives a new file (``0644`` under the usual umask ``022``), also when it
replaces an existing file (a bare ``mkstemp`` would leave ``0600``). A write refused by a full disk
(:func:`is_disk_full`) leaves no temporary behind and names the file asked for, which
:func:`disk_full_message` puts in one line for the user.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

MIB = 2**20
GIB = 2**30


# ---------------------------------------------------------------------- sizes
def parse_size(text: str | int | float) -> int:
    """'24GB', '24G', '1.5GiB', '512MB', '512MiB' or a number of bytes -> bytes (GB and GiB both 2**30)."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match:
        raise ValueError(f"cannot read memory size {text!r}; write it like 24GB, 1.5GiB or 512MB")
    try:
        number = float(match.group(1))
    except ValueError as error:
        raise ValueError(f"cannot read memory size {text!r}; write it like 24GB, 1.5GiB or 512MB") from error
    return int(number * 1024 ** "_kmgt".index(match.group(2) or "_"))


def format_size(size: float) -> str:
    """Bytes for people: ``1.50 GiB`` from one GiB up, whole MiB below."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / MIB:.0f} MiB"


def size_flag(size: int) -> str:
    """A ``--max-memory`` value of at least ``size`` bytes: whole MB below 1 GiB, tenths of GB above."""
    if size < GIB:
        return f"{-(-size // MIB)}MB"
    return f"{-(-size * 10 // GIB) / 10:.1f}".removesuffix(".0") + "GB"  # no exponent, even for petabytes


# ---------------------------------------------------------------------- files
def current_umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    umask = None
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
                break
    if umask is None:  # not Linux: read it by setting it (briefly process-wide)
        umask = os.umask(0o022)
        os.umask(umask)
    return umask


def new_file_mode() -> int:
    """The mode a newly created file gets under the current umask (``0o666 & ~umask``)."""
    return 0o666 & ~current_umask()


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # a full disk, or the user's quota spent


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a write refused for want of space (``ENOSPC``) or of quota (``EDQUOT``)."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def disk_full_behind(error: BaseException, path: str | os.PathLike) -> OSError | None:
    """The full-disk :class:`OSError` behind ``error``, naming ``path``; None when the disk was not full.

    That is ``error`` itself, the one a writer's clean-up raised over (``torch.save``'s zip writer raises
    a ``RuntimeError`` while handling it), or a Rust writer's ``... (os error 28)`` (safetensors).
    """
    seen = error
    while seen is not None and not is_disk_full(seen):
        seen = seen.__context__
    if seen is None:
        found = re.search(r"\(os error (\d+)\)", str(error))
        if found is None or int(found.group(1)) not in DISK_FULL_ERRNOS:
            return None
        seen = OSError(int(found.group(1)), os.strerror(int(found.group(1))))
    assert isinstance(seen, OSError)
    seen.filename = os.fspath(path)  # the file asked for, not a temporary one (gone by now)
    return seen


def disk_full_message(error: OSError) -> str:
    """One line for a write that failed on a full disk: what could not be written, the space left on that
    disk (for ``ENOSPC``; a quota is not what the disk reports free), what to do."""
    reason = error.strerror or os.strerror(error.errno or errno.ENOSPC)
    if error.filename is None:
        return f"an output could not be written: {reason}; free some space or write to another disk"
    path = Path(os.fsdecode(error.filename))
    free = ""
    if error.errno == errno.ENOSPC:
        with contextlib.suppress(OSError):
            left = shutil.disk_usage(nearest_existing(path)).free
            free = f", {format_size(left) if left >= MIB else f'{left:,} bytes'} free on its disk"
    return f"cannot write {path} ({reason}{free}); free some space there or write to another disk"


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` itself when it exists, else its nearest existing parent."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def probe_writable(folder: str | os.PathLike) -> Path:
    """Prove, before any work, that entries can be made under ``folder``; returns the folder probed.

    That is ``folder`` itself or, while it does not exist, its nearest existing parent. Permissions alone do
    not tell (root passes every permission check, yet cannot write under ``/proc``), so a temporary folder
    is made there and removed at once: nothing is left behind. Raises :class:`NotADirectoryError` when the
    nearest existing path is a file, or the probe's :class:`OSError`; both name the probed path
    (``filename``).
    """
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".linfusion-write-test.", dir=existing))
    except OSError as error:
        error.filename = str(existing)
        raise
    return existing


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """``with atomic_file(path) as handle: ...`` writes ``path`` completely or not at all.

    The parent folder must exist. On an exception inside the block the temporary file is removed and
    ``path`` is untouched.
    """
    target = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(descriptor, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, new_file_mode())
        os.replace(temporary, target)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        full = disk_full_behind(error, target)
        if full is not None and full is not error:
            raise full from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_file`; returns the path."""
    with atomic_file(path, "w") as handle:
        handle.write(text)
    return Path(path)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_folder(final) as folder: ...``: fill a temporary sibling folder, then swap it in.

    An existing ``final`` is replaced only after the new content is complete; on an exception the
    temporary folder is removed and ``final`` is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield temporary
        os.chmod(temporary, 0o777 & ~current_umask())  # mkdtemp makes 0700
        replace_folder(temporary, final)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        full = disk_full_behind(error, final)
        if full is not None and full is not error:
            raise full from None
        raise


def replace_folder(complete: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the ``complete`` folder onto ``final``; an existing ``final`` goes only once the new one is in."""
    complete, final = Path(complete), Path(final)
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(complete, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(complete, final)


@contextlib.contextmanager
def umask_mode_for_new_files(folder: str | os.PathLike) -> Iterator[Path]:
    """Files created or replaced under ``folder`` inside the block get the umask's mode afterwards.

    For writers that create private files: safetensors' ``save_file`` (behind every diffusers
    ``save_pretrained``) writes ``0600`` whatever the umask.
    """
    root = Path(folder)

    def files() -> dict[Path, tuple[int, int]]:
        if not root.is_dir():
            return {}
        return {
            path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in root.rglob("*") if path.is_file()
        }

    before = files()
    yield root
    mode = new_file_mode()
    for path, identity in files().items():
        if before.get(path) != identity:
            os.chmod(path, mode)


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_file` (checkpoints are never half written)."""
    import torch

    with atomic_file(path) as handle:
        torch.save(obj, handle)
    return Path(path)


__all__ = [
    "DISK_FULL_ERRNOS",
    "GIB",
    "MIB",
    "atomic_file",
    "atomic_folder",
    "atomic_write_text",
    "current_umask",
    "disk_full_behind",
    "disk_full_message",
    "format_size",
    "is_disk_full",
    "nearest_existing",
    "new_file_mode",
    "parse_size",
    "probe_writable",
    "replace_folder",
    "size_flag",
    "torch_save",
    "umask_mode_for_new_files",
]
