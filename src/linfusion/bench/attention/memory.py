"""Peak memory of each case: torch allocations, and on CPU the RSS of a child process whose malloc returns
freed memory (so RSS follows live memory; ``python -m linfusion.bench.attention --memory-worker``)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

from ...runtime import return_freed_memory
from ..harness import rss_peak
from .config import DTYPES
from .timing import case_callable, make_qkv


def tensor_peak_bytes_cpu(fn: Callable[[], Any]) -> int:
    """Peak bytes of torch CPU tensor allocations alive at once during fn, beyond those before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _memory_case(case: dict[str, Any], device: torch.device) -> dict[str, Any]:
    dtype = DTYPES[case["dtype"]]
    q, k, v = make_qkv(
        case["batch"], case["heads"], case["tokens"], case["head_dim"], dtype, device, case["seed"]
    )
    qkv_bytes = 3 * q.numel() * q.element_size()
    fn = case_callable(case["backend"], case["mode"], q, k, v)
    result: dict[str, Any] = {"qkv_bytes": qkv_bytes}
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        result["tensor_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        fn()  # first call outside the measurement (lazy initialisation of kernels, thread pools)
        result["rss_peak_bytes"] = rss_peak(fn)
        result["tensor_peak_bytes"] = tensor_peak_bytes_cpu(fn)
    result["tensor_peak_over_qkv"] = result["tensor_peak_bytes"] / qkv_bytes
    if result.get("rss_peak_bytes") is not None:
        result["rss_peak_over_qkv"] = result["rss_peak_bytes"] / qkv_bytes
    return result


def memory_worker(cases: list[dict[str, Any]], device_name: str, threads: int | None) -> list[dict[str, Any]]:
    """Measure the peak memory of each case (run in a child process on CPU, see module docstring)."""
    device = torch.device(device_name)
    malloc_limited = device.type == "cpu" and return_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    out = []
    for case in cases:
        try:
            measured = _memory_case(case, device)
            measured["malloc_limited"] = malloc_limited
        except Exception as error:  # noqa: BLE001 - report (e.g. out of memory) and go on
            measured = {"error": f"{type(error).__name__}: {error}"}
        out.append({**case, **measured})
        gc.collect()
    return out


def measure_memory(cases: list[dict[str, Any]], device: torch.device, threads: int | None) -> list[dict]:
    if not cases:
        return []
    if device.type != "cpu":
        return memory_worker(cases, str(device), threads)
    payload = json.dumps({"cases": cases, "device": "cpu", "threads": threads})
    proc = subprocess.run(
        [sys.executable, "-m", "linfusion.bench.attention", "--memory-worker"],
        input=payload,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
