"""The share of a plain matrix multiply's rate that a whole chain sustains on this CPU: ``CPU_EFFICIENCY``.

``linfusion generate`` predicts a run's time as the memory plan's FLOPs over ``cpu_matmul_rate() x
CPU_EFFICIENCY`` (``linfusion.app.timing``). This script measures that share: each run is a fresh process
that loads the bundled model, plans the request as the command line does (FLOPs of every stage), measures
the matrix-multiply rate, then times the chain. Efficiency = FLOPs / wall time / matmul rate. Writes
``benchmarks/results/<stem>.json`` (raw) and ``.md``.

    PYTHONPATH=src python benchmarks/cpu_efficiency.py --sizes 512,1024 --runs 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from linfusion.bench.harness import environment, loadavg, write_results

PROMPT = "a large red circle in the center, on a white background"


def child(size: int, threads: int) -> dict[str, Any]:
    """One measured run in this process: plan FLOPs, matmul rate, chain time."""
    import torch

    from linfusion.runtime import keep_freed_memory

    keep_freed_memory()  # as the command line runs
    torch.set_num_threads(threads)
    from linfusion.app.execute import render
    from linfusion.app.loading import load
    from linfusion.app.params import GenerationParams
    from linfusion.app.prepare import prepare
    from linfusion.app.timing import CPU_EFFICIENCY, cpu_matmul_rate

    params = GenerationParams(prompt=PROMPT, mode="sdedit", width=size, height=size, model="bundled")
    loaded = load(params, "cpu")
    loaded.pipe.set_progress_bar_config(disable=True)
    run = prepare(loaded.params, loaded.pipe, patch=loaded.patch)
    params, stages, plan = run.params, run.stages, run.memory
    rate = cpu_matmul_rate()
    start = time.perf_counter()
    render(loaded, run)
    seconds = time.perf_counter() - start
    return {
        "size": size, "threads": threads, "stages": [list(stage.size) for stage in stages],
        "steps": params.steps, "vae_attention": params.vae_attention, "flops": plan.flops,
        "matmul_rate": rate, "seconds": seconds, "efficiency": plan.flops / seconds / rate,
        "predicted_seconds": plan.flops / (rate * CPU_EFFICIENCY), "cpu_efficiency_constant": CPU_EFFICIENCY,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="512,1024", help="final sizes (square), comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.threads)))
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    import torch

    command = "python benchmarks/cpu_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {
        "environment": environment(torch.device("cpu"), args.threads, command),
        "runs": [],
    }
    for size in (int(text) for text in args.sizes.split(",")):
        for _ in range(args.runs):
            load = loadavg()
            output = subprocess.run(
                [sys.executable, __file__, "--child", str(size), "--threads", str(args.threads)],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            run = json.loads(output.stdout.strip().splitlines()[-1])
            run["loadavg_start"] = load
            result["runs"].append(run)
            print(f"{size}: {run['seconds']:.1f} s, efficiency {run['efficiency']:.3f}", file=sys.stderr)
    result["environment"]["loadavg_end"] = loadavg()
    rows = []
    for size in sorted({run["size"] for run in result["runs"]}):
        runs = [run for run in result["runs"] if run["size"] == size]
        seconds = statistics.median(run["seconds"] for run in runs)
        efficiency = statistics.median(run["efficiency"] for run in runs)
        predicted = statistics.median(run["predicted_seconds"] for run in runs)
        rows.append(
            f"| {size}x{size} | {runs[0]['flops']:.3g} | {statistics.median(r['matmul_rate'] for r in runs) / 1e9:.1f} "
            f"| {seconds:.1f} | {predicted:.1f} | {efficiency:.3f} | "
            + ", ".join(f"{run['efficiency']:.3f}" for run in runs)
            + " |"
        )
    environment_line = result["environment"]
    report = "\n".join([
        "# CPU efficiency of a whole chain (bundled model, SDEdit, defaults)",
        "",
        f"`{command}`; {environment_line['cpu_model']} ({environment_line['cpu_count']} cores), torch "
        f"{environment_line['torch_version']}, {args.threads} thread(s); load average "
        f"{environment_line['loadavg_start']} at the start, "
        f"{environment_line['loadavg_end']} at the end. Each run a fresh process; wall time of the chain after "
        "loading and planning; FLOPs from the memory plan (UNet calls and VAE passes); matmul rate: "
        "`linfusion.app.timing.cpu_matmul_rate` in the same process. Predicted: with the constant in use "
        f"({result['runs'][0]['cpu_efficiency_constant']}).",
        "",
        "| size | FLOPs | matmul GFLOP/s | median time (s) | predicted (s) | median efficiency | every run |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    write_results(args.out, f"cpu-efficiency-bundled-{args.threads}thread", result, report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
