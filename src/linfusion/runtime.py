"""Process set-up for the applications (the command line, the web UI server): the allocator and the
third-party notices.

Nothing here runs on ``import linfusion``: a library user's process is left as it is unless they call
these functions themselves.

**The allocator.** glibc serves large allocations (above its mmap threshold, which starts at 128 KiB and
rises with use to at most 32 MiB) with a fresh ``mmap`` and gives them back to the kernel on ``free``, so
a diffusion step that allocates and frees the same large activations layer after layer faults all of
that memory in again, page by page, every time. At 1024x1024 on the bundled model the kernel's share of
the CPU time was about a third (README).
:func:`keep_freed_memory` tells glibc to serve large blocks from its heap and to keep freed memory for
reuse (``mallopt``: no mmap, no trimming, a 1 GiB top pad), which is what the environment variables
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... MALLOC_TOP_PAD_=1073741824`` do at start-up. The price
is a higher resident peak: freed memory stays with the process until it exits, and long-lived tensors
fragment it; where a run's memory is tight the application returns freed memory for that run
(:func:`freed_memory_returned`). Set
``LINFUSION_MALLOC_TUNING=0`` to leave glibc's defaults; any ``MALLOC_*_`` variable or malloc tunable of
your own also wins.

**Third-party notices.** :func:`quiet_third_party_notices` silences, for the duration of a command, the
warnings and log lines of diffusers, transformers and accelerate that tell a user nothing they can act on
(optional backends not installed, deprecations meant for developers, loading bars of a model that loads in
a second). The denoising progress bars are linfusion's and stay.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

MALLOC_TUNING_VARIABLE = "LINFUSION_MALLOC_TUNING"

_allocator = {"keeps_freed_memory": False}  # what this process's glibc was last told
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
KEEP_FREED_MEMORY = (
    (_M_MMAP_MAX, 0),  # no mmap for large blocks: they come from the heap and go back to it
    (_M_TRIM_THRESHOLD, -1),  # never give the heap's free top back to the kernel (-1: trimming off)
    (_M_TOP_PAD, 2**30),  # grow the heap by 1 GiB more than asked, so growth is rare
)
RETURN_FREED_MEMORY = (
    (_M_MMAP_MAX, 65536),  # glibc's default: large blocks may be mmapped again
    (_M_MMAP_THRESHOLD, 64 * 1024),  # blocks from 64 KiB up get their own mmap, unmapped at free
    (_M_TRIM_THRESHOLD, 0),  # and the heap's free top goes back at once: RSS follows live memory
    (_M_TOP_PAD, 128 * 1024),  # glibc's default
)
# Environment settings of the user's own that the tuning must not override.
_OWN_MALLOC_VARIABLES = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_THRESHOLD_",
)

THIRD_PARTY_LOGGERS = ("diffusers", "transformers", "accelerate", "huggingface_hub")


def malloc_tuning_wanted() -> bool:
    """False when ``LINFUSION_MALLOC_TUNING=0`` (or off/no/false) or the user tuned glibc malloc already."""
    if os.environ.get(MALLOC_TUNING_VARIABLE, "1").strip().lower() in ("0", "off", "no", "false"):
        return False
    if any(name in os.environ for name in _OWN_MALLOC_VARIABLES):
        return False
    return "glibc.malloc." not in os.environ.get("GLIBC_TUNABLES", "")


def set_malloc_options(options: tuple[tuple[int, int], ...]) -> bool:
    """Apply glibc ``mallopt(parameter, value)`` pairs; False where there is no ``mallopt`` or one fails."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in options)


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed memory for reuse (see the module docstring); True when applied.

    Call it once, early (before the large allocations start). It does nothing, and returns False, when
    opted out (``LINFUSION_MALLOC_TUNING=0``, or malloc settings of the user's own) or without glibc.
    """
    applied = malloc_tuning_wanted() and set_malloc_options(KEEP_FREED_MEMORY)
    _allocator["keeps_freed_memory"] = applied or _allocator["keeps_freed_memory"]
    return applied


def return_freed_memory() -> bool:
    """The opposite, for measuring: large blocks are unmapped when freed, so RSS tracks live memory."""
    applied = set_malloc_options(RETURN_FREED_MEMORY)
    if applied:
        _allocator["keeps_freed_memory"] = False
        with contextlib.suppress(AttributeError, OSError):
            ctypes.CDLL(None).malloc_trim(0)  # what the heap kept so far goes back too
    return applied


def keeps_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` is in effect in this process."""
    return _allocator["keeps_freed_memory"]


@contextlib.contextmanager
def freed_memory_returned() -> Iterator[None]:
    """Within the block glibc returns freed memory (:func:`return_freed_memory`); after it, the setting
    that was in effect before comes back.

    Keeping freed memory is fast but fragments: long-lived tensors (skips, a CFG branch's output, a stored
    band) end up between freed blocks, and the resident peak rises well above the live tensors (1.7-1.8x
    the memory plan's estimate in chains whose stages need savers on the CPU). Where memory is tight the
    application returns freed memory instead, so the peak follows the plan.
    """
    kept = keeps_freed_memory()
    return_freed_memory()
    try:
        yield
    finally:
        if kept:
            keep_freed_memory()


def _loading_bar_switches() -> list[Any]:
    """The ``utils.logging`` modules of diffusers and transformers (they switch the loading bars)."""
    modules = []
    for library in ("diffusers", "transformers"):
        with contextlib.suppress(ImportError):
            modules.append(importlib.import_module(f"{library}.utils.logging"))
    return modules


@contextlib.contextmanager
def quiet_third_party_notices() -> Iterator[None]:
    """Within the block: third-party log lines below ERROR, their warnings (and every FutureWarning and
    DeprecationWarning), and the model-loading bars of diffusers and transformers are not shown;
    everything is restored after.

    The libraries read their verbosity from the environment when first imported, so the variables are
    set too (and restored), which covers libraries imported inside the block.
    """
    variables = {"DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}
    saved_variables = {name: os.environ.get(name) for name in variables}
    saved_levels = {name: logging.getLogger(name).level for name in THIRD_PARTY_LOGGERS}
    switches = _loading_bar_switches()
    bars_were_on = [switch.is_progress_bar_enabled() for switch in switches]
    os.environ.update(variables)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for switch in switches:
        switch.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category)
            warnings.filterwarnings("ignore", module=r"(diffusers|transformers|accelerate|huggingface_hub)\b")
            yield
    finally:
        for switch, was_on in zip(switches, bars_were_on):
            if was_on:
                switch.enable_progress_bar()
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        for name, value in saved_variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


__all__ = [
    "KEEP_FREED_MEMORY",
    "MALLOC_TUNING_VARIABLE",
    "THIRD_PARTY_LOGGERS",
    "RETURN_FREED_MEMORY",
    "freed_memory_returned",
    "keep_freed_memory",
    "keeps_freed_memory",
    "malloc_tuning_wanted",
    "quiet_third_party_notices",
    "return_freed_memory",
    "set_malloc_options",
]
