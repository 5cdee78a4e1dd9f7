"""The effect of ``linfusion.runtime.keep_freed_memory`` on a real command: wall, CPU, page faults, peak RSS.

Runs one ``linfusion`` command several times with the allocator setting the command line applies by
itself (glibc keeps freed memory) and with ``LINFUSION_MALLOC_TUNING=0`` (glibc's defaults), alternating
the two so that a change in the machine's load hits both alike, and reads each child's resource usage
from ``os.wait4``. Every run writes its PNG; the pixels of all runs must be identical. Writes
``benchmarks/results/<stem>.json`` (raw) and ``.md``.

    PYTHONPATH=src python benchmarks/allocator.py --runs 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from linfusion.bench.harness import environment, loadavg, write_results
from linfusion.runtime import MALLOC_TUNING_VARIABLE

PROMPT = "a large red circle in the center, on a white background"
SETTINGS = {"keep freed memory (default)": "1", "glibc defaults (LINFUSION_MALLOC_TUNING=0)": "0"}


def command_for(size: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "linfusion", "generate", PROMPT, "--mode", "sdedit", "--size", size,
        "--vae-attention", "linear", "--device", "cpu", "--quiet", "--out", str(out),
    ]  # fmt: skip


def timed_run(command: list[str], tuning: str, threads: int | None) -> dict[str, Any]:
    """One run of ``command`` in a child; its wall time and resource usage (``os.wait4``)."""
    env = {**os.environ, MALLOC_TUNING_VARIABLE: tuning, "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    load = loadavg()
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    stderr = child.stderr.read().decode() if child.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{stderr[-3000:]}")
    return {
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "minor_faults": usage.ru_minflt,
        "max_rss_bytes": usage.ru_maxrss * 1024,
        "loadavg_before": load,
    }


def pixel_digest(path: Path) -> str:
    return hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians; ``cpu_s`` (user + sys) is the figure other jobs on the machine disturb least."""
    keys = ("wall_s", "user_s", "sys_s", "minor_faults", "max_rss_bytes")
    medians = {key: statistics.median(run[key] for run in runs) for key in keys}
    medians["cpu_s"] = statistics.median(run["user_s"] + run["sys_s"] for run in runs)
    return medians


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# Allocator setting: `linfusion generate ... --size {result['size']}` (bundled model)",
        "",
        f"CPU: {env['cpu_model']} ({env['cpu_count']} cores, shared with other jobs: load average "
        f"{env['loadavg_start']} at the start, {env.get('loadavg_end')} at the end), torch "
        f"{env['torch_version']}, {result.get('threads', env['torch_threads'])} thread(s). Wall times follow the other jobs' load; the CPU "
        f"time and the page faults much less. Command: `{result['command']}`. Median of "
        f"{result['runs_per_setting']} runs per setting, the settings alternating.",
        "",
        "| setting | wall (s) | user (s) | sys (s) | CPU = user + sys (s) | minor page faults | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, stats in result["median"].items():
        lines.append(
            f"| {name} | {stats['wall_s']:.1f} | {stats['user_s']:.1f} | {stats['sys_s']:.1f} "
            f"| {stats['cpu_s']:.1f} | {stats['minor_faults'] / 1e6:.2f} M | {stats['max_rss_bytes'] / 2**30:.2f} GiB |"
        )
    default, plain = result["median"].values()
    lines += [
        "",
        f"glibc defaults / keep freed memory: wall {plain['wall_s'] / default['wall_s']:.2f}x, CPU "
        f"{plain['cpu_s'] / default['cpu_s']:.2f}x, sys {plain['sys_s'] / max(default['sys_s'], 1e-9):.1f}x, faults "
        f"{plain['minor_faults'] / max(default['minor_faults'], 1):.1f}x. Identical pixels in every run: "
        f"{result['identical_pixels']}.",
        "",
        "Every run: " + "; ".join(
            f"{run['setting']} {run['wall_s']:.1f} s (load {run['loadavg_before'][0] if run['loadavg_before'] else '?'})"
            for run in result["runs"]
        ),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--runs", type=int, default=3, help="runs per setting")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: torch's)"
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="allocator-"))
    result: dict[str, Any] = {
        "size": args.size,
        "command": shlex.join(["linfusion", *command_for(args.size, Path("OUT.png"))[3:]]),
        "runs_per_setting": args.runs,
        "threads": args.threads or torch.get_num_threads(),
        "environment": environment(
            torch.device("cpu"), args.threads or torch.get_num_threads(), shlex.join(sys.argv)
        ),
        "runs": [],
    }
    digests = set()
    for index in range(args.runs):
        order = list(SETTINGS.items()) if index % 2 == 0 else list(reversed(SETTINGS.items()))
        for name, tuning in order:
            out = folder / f"{index}-{tuning}.png"
            run = {"setting": name, **timed_run(command_for(args.size, out), tuning, args.threads)}
            digests.add(pixel_digest(out))
            result["runs"].append(run)
            print(f"{name}: wall {run['wall_s']:.1f} s, user {run['user_s']:.1f} s, sys {run['sys_s']:.1f} s, "
                  f"{run['minor_faults'] / 1e6:.2f} M faults, peak RSS {run['max_rss_bytes'] / 2**30:.2f} GiB",
                  flush=True)  # fmt: skip
    result["environment"]["loadavg_end"] = loadavg()
    result["identical_pixels"] = len(digests) == 1
    result["median"] = {
        name: summary([r for r in result["runs"] if r["setting"] == name]) for name in SETTINGS
    }
    report = markdown(result)
    stem = f"allocator-cpu-bundled-sdedit-{args.size}" + (f"-{args.threads}thread" if args.threads else "")
    paths = write_results(args.out, stem, result, report)
    print(report)
    print(f"wrote {paths['json']} and {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
