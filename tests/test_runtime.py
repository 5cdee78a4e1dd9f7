"""Process set-up for the applications: glibc keeps freed memory; third-party notices are silenced."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

from linfusion.runtime import MALLOC_TUNING_VARIABLE, malloc_tuning_wanted, quiet_third_party_notices

FAULTS_PROBE = """
import ctypes, resource, sys
from linfusion.runtime import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_size_t,), (ctypes.c_void_p,)
size = 64 * 2**20  # far above glibc's mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):  # what each layer of each step does: allocate, touch, free
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * 4096 / size)
"""


def faults_per_block(tuning: str) -> tuple[bool, float]:
    env = {**os.environ, MALLOC_TUNING_VARIABLE: tuning}
    done = subprocess.run(
        [sys.executable, "-c", FAULTS_PROBE], capture_output=True, text=True, env=env, check=True
    )
    applied, pages = done.stdout.split()
    return applied == "True", float(pages)


@pytest.mark.multiprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    """Eight 64 MiB blocks in turn: faulted in once with the setting, eight times without it."""
    applied, kept = faults_per_block("1")
    not_applied, default = faults_per_block("0")
    assert applied and not not_applied
    assert kept < 1.5 and default > 7.0, (kept, default)


RETURNED_PROBE = """
import ctypes, resource
from linfusion.runtime import freed_memory_returned, keep_freed_memory, keeps_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_size_t,), (ctypes.c_void_p,)
size = 64 * 2**20

def pages_per_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * 4096 / size

applied = keep_freed_memory()
pages_per_block()  # the heap grows once
kept_before = pages_per_block()
with freed_memory_returned():
    inside_flag = keeps_freed_memory()
    inside = pages_per_block()
print(applied, kept_before, inside_flag, inside, keeps_freed_memory())
"""


@pytest.mark.multiprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_returned_inside_the_block_and_kept_again_after() -> None:
    """Inside ``freed_memory_returned`` every 64 MiB block is a fresh mapping given back at free (faulted in
    each time, so the resident peak follows live memory); the setting before comes back after the block."""
    env = {**os.environ, MALLOC_TUNING_VARIABLE: "1"}
    done = subprocess.run([sys.executable, "-c", RETURNED_PROBE], capture_output=True, text=True, env=env,
                          check=True)  # fmt: skip
    applied, kept_before, inside_flag, inside, after_flag = done.stdout.split()
    assert applied == "True" and after_flag == "True" and inside_flag == "False"
    assert float(kept_before) < 0.5 and float(inside) > 7.0, done.stdout


def test_the_allocator_setting_can_be_turned_off_and_yields_to_the_users_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(MALLOC_TUNING_VARIABLE, raising=False)
    assert malloc_tuning_wanted()
    for off in ("0", "off", "no"):
        monkeypatch.setenv(MALLOC_TUNING_VARIABLE, off)
        assert not malloc_tuning_wanted()
    monkeypatch.setenv(MALLOC_TUNING_VARIABLE, "1")
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    assert not malloc_tuning_wanted()
    monkeypatch.delenv("MALLOC_TOP_PAD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    assert not malloc_tuning_wanted()


def test_third_party_notices_are_silenced_inside_the_block_only(recwarn: pytest.WarningsRecorder) -> None:
    import diffusers.utils.logging as diffusers_logging

    bars_before = diffusers_logging.is_progress_bar_enabled()
    level_before = logging.getLogger("transformers").level
    with quiet_third_party_notices():
        assert not logging.getLogger("diffusers").isEnabledFor(logging.WARNING)
        assert not logging.getLogger("transformers.utils.import_utils").isEnabledFor(logging.WARNING)
        assert not diffusers_logging.is_progress_bar_enabled()
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
        warnings.warn("`torch_dtype` is deprecated", FutureWarning, stacklevel=1)
        assert len(recwarn) == 0
    assert diffusers_logging.is_progress_bar_enabled() == bars_before
    assert logging.getLogger("transformers").level == level_before
    with pytest.warns(FutureWarning):  # library users keep every warning
        warnings.warn("`torch_dtype` is deprecated", FutureWarning, stacklevel=1)
