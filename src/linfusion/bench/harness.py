"""What every benchmark shares: the machine's description, load, memory peaks, and result files.

A benchmark result must say where and how it was measured (device, CPU or GPU model, threads, versions,
the exact command, the load average before and after), and its peaks must be real: CUDA's
``max_memory_allocated``, or on the CPU the RSS high-water mark reset through ``/proc/self/clear_refs``.
Results are written as JSON (raw) and Markdown (for people), both atomically.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import UserError
from ..io import atomic_write_text


class BenchmarkInputError(UserError, ValueError):
    """A benchmark's settings cannot work (a size, a budget, a model, a dtype); the message says why."""


def read_status_kib(field_name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's peak statistics, or the RSS high-water mark (VmHWM := current RSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def peak_bytes(device: torch.device) -> int:
    """The peak since :func:`reset_peak`: ``max_memory_allocated`` on CUDA, the RSS high-water mark on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return read_status_kib("VmHWM") * 1024


def rss_peak(fn: Callable[[], Any]) -> int | None:
    """Peak RSS increase during ``fn`` (bytes); needs Linux ``clear_refs``, None where unsupported."""
    try:
        gc.collect()
        reset_peak(torch.device("cpu"))
        before = read_status_kib("VmRSS")
        result = fn()
        del result
        return max(0, (read_status_kib("VmHWM") - before) * 1024)
    except OSError:
        return None


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where unavailable)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def wait_for_idle(max_seconds: float, threshold: float, poll: float = 30.0) -> list[float] | None:
    """Poll the 1-minute load average until it drops below ``threshold`` (or time runs out)."""
    deadline = time.monotonic() + max_seconds
    while True:
        load = loadavg()
        if load is None:
            return None
        if load[0] < threshold or time.monotonic() >= deadline:
            return load
        print(f"load average {load[0]:.2f} >= {threshold}; waiting", flush=True)
        time.sleep(poll)


def environment(device: torch.device, threads: int, command: str | None = None) -> dict[str, Any]:
    """Where and how a benchmark ran, for its JSON."""
    cpu_model = platform.processor() or ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    env: dict[str, Any] = {
        "device": device.type,
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch_version": torch.__version__,
        "linfusion_version": __version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "command": command or "",
        "process_command": " ".join(shlex.quote(a) for a in getattr(sys, "orig_argv", sys.argv)),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "thp_mem_alloc_enabled": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
    }
    env["loadavg_start"] = loadavg()
    if device.type == "cuda":
        env["gpu_name"] = torch.cuda.get_device_name(device)
    try:
        import triton

        env["triton_version"] = triton.__version__
    except Exception:  # noqa: BLE001 - any failure to import means "not available"
        env["triton_version"] = None
    return env


def write_results(
    out_dir: str | os.PathLike, stem: str, result: dict[str, Any], markdown: str
) -> dict[str, Path]:
    """``<out_dir>/<stem>.json`` (raw) and ``.md`` (for people), each written atomically."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{stem}.json", "md": folder / f"{stem}.md"}
    atomic_write_text(paths["json"], json.dumps(result, indent=1) + "\n")
    atomic_write_text(paths["md"], markdown.rstrip("\n") + "\n")
    return paths


__all__ = [
    "BenchmarkInputError",
    "environment",
    "loadavg",
    "peak_bytes",
    "read_status_kib",
    "reset_peak",
    "rss_peak",
    "wait_for_idle",
    "write_results",
]
