"""End-to-end high-resolution benchmark: a whole SDEdit / DemoFusion chain, LinFusion vs SDPA.

Every configuration runs in a fresh child process (peak memory depends on the heap's history), which
times each stage and reads its peak: the RSS high-water mark on CPU (reset per stage through
``/proc/self/clear_refs``), ``torch.cuda.max_memory_allocated`` on CUDA. SDPA's attention grows with the
square of the pixel count, so before each SDPA stage its time is predicted from the previous stage
(per-step time x area ratio squared x steps) and the chain stops where the prediction passes the cap;
the skipped stages are recorded with their prediction, never with a made-up measurement.

Models: a pipeline folder or Hub id, ``bundled`` (the project's small model), or ``random-sd15`` /
``random-sdxl``: full-size UNet, VAE and text encoders with random weights, built on the device (no
download), for GPU timings at 4K-16K.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..io import format_size, parse_size
from ..runtime import keep_freed_memory
from .harness import (
    BenchmarkInputError,
    environment,
    loadavg,
    peak_bytes,
    read_status_kib,
    reset_peak,
    write_results,
)


# ---------------------------------------------------------------------- the child: one configuration
def _load(model: str, device: torch.device, dtype: torch.dtype, linfusion: bool) -> Any:
    from ..app.loading import attach_linfusion, load_pipeline, resolve_model

    path = resolve_model(model)
    pipe = load_pipeline(path, device, dtype)
    if linfusion:
        attach_linfusion(pipe, path, "auto")
    return pipe


class _StopChain(Exception):
    pass


def run_configuration(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one chain as ``spec`` says; the per-stage record (in this process)."""
    from ..app.execute import memory_allocator
    from ..app.prepare import Budgets, plan_memory
    from ..patches.vae_attention import apply_vae_attention
    from ..pipelines import demofusion, plan_stages, sdedit
    from ..planner import MemoryPlanner
    from ..registry import is_sdxl

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    load_start = time.perf_counter()
    pipe = _load(spec["model"], device, dtype, spec["attention"] == "linfusion")
    pipe.set_progress_bar_config(disable=True)
    apply_vae_attention(pipe.vae, spec.get("vae_attention", "exact"))  # this process's own pipeline: kept
    load_seconds = time.perf_counter() - load_start
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = spec["width"], spec["height"]
    plan = plan_stages(width, height, native, sdxl=is_sdxl(pipe) or spec["mode"] == "demofusion")
    stages: list[dict[str, Any]] = []
    steps_in_stage = [0]
    clock = {"start": 0.0}
    cap = spec.get("cap_seconds")
    memory_plan = None
    if spec.get("max_memory"):
        budgets = Budgets(parse_size(spec["max_memory"]))
        memory_plan = plan_memory(
            MemoryPlanner(pipe), plan, budgets, spec["guidance"], spec["steps"], spec["mode"]
        )
        print(memory_plan.describe(), file=sys.stderr)

    def on_step(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        steps_in_stage[0] += 1
        return tensors

    def on_stage_end(index: int, stage: Any, image: Any) -> None:
        seconds = time.perf_counter() - clock["start"]
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))
        stages.append(
            {
                "stage": index + 1,
                "width": stage.width,
                "height": stage.height,
                "strength": stage.strength,
                "steps": steps_in_stage[0],
                "seconds": seconds,
                "peak_bytes": peak_bytes(device),
                "finite": bool(torch.isfinite(pixels).all()),
                "pixel_std": float(pixels.std()),
            }
        )
        if memory_plan is not None:
            stages[-1]["planned_peak_bytes"] = memory_plan.stages[index].peak
            stages[-1]["savers"] = memory_plan.stages[index].savers.names()
        print(
            json.dumps({"stage_done": stages[-1]}), file=sys.stderr, flush=True
        )  # kept if the run times out
        if index + 1 < len(plan) and cap is not None:
            upcoming = plan[index + 1]
            ratio = (upcoming.width * upcoming.height) / (stage.width * stage.height)
            per_step = seconds / max(1, steps_in_stage[0])
            steps = max(1, int(spec["steps"] * (upcoming.strength or 1.0)))
            predicted = per_step * ratio**2 * steps
            if predicted > cap:
                stages.append({"stage": index + 2, "width": upcoming.width, "height": upcoming.height,
                               "skipped": True, "predicted_seconds": predicted})  # fmt: skip
                raise _StopChain
        steps_in_stage[0] = 0
        reset_peak(device)
        clock["start"] = time.perf_counter()

    run = sdedit if spec["mode"] == "sdedit" else demofusion
    with memory_allocator(memory_plan, device):  # as the command line runs it (tight memory: returned)
        baseline = peak_bytes(device) if device.type == "cuda" else read_status_kib("VmRSS") * 1024
        reset_peak(device)
        total_start = clock["start"] = time.perf_counter()
        completed = True
        try:
            with torch.inference_mode():
                run(
                    pipe, spec["prompt"], width, height, num_inference_steps=spec["steps"],
                    guidance_scale=spec["guidance"], generator=torch.Generator(device).manual_seed(spec["seed"]),
                    callback_on_step_end=on_step, on_stage_end=on_stage_end,
                    exact_vae_tiling_from=spec["tile_from"], memory_plan=memory_plan,
                )  # fmt: skip
        except _StopChain:
            completed = False
    return {
        **spec,
        "load_seconds": load_seconds,
        "baseline_bytes": baseline,
        "completed": completed,
        "total_seconds": time.perf_counter() - total_start if completed else None,
        "stages": stages,
    }


# ---------------------------------------------------------------------- the parent: all configurations
USER_ERROR_STATUS = 2  # a child that found the settings unworkable (its message on stdout, as JSON)


def _child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads") or os.cpu_count())}
    command = [sys.executable, "-m", "linfusion.bench.highres", "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else expired.stderr or ""
        return {**spec, "error": f"timed out after {timeout:.0f} s", "stages": _finished_stages(stderr)}
    if done.returncode == USER_ERROR_STATUS:
        raise BenchmarkInputError(json.loads(done.stdout.strip().splitlines()[-1])["user_error"])
    if done.returncode != 0:
        return {**spec, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _finished_stages(stderr: str) -> list[dict[str, Any]]:
    """The stage records a child printed before it was stopped."""
    marker = '{"stage_done": '
    return [json.loads(line)["stage_done"] for line in stderr.splitlines() if line.startswith(marker)]


def _fmt_bytes(size: int | None) -> str:
    return "-" if size is None else format_size(size)


def markdown_report(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# High-resolution chain: {result['config']['model']} {result['config']['mode']} "
        f"{result['config']['width']}x{result['config']['height']}",
        "",
        f"Device: {env['device']} ({env.get('gpu_name') or env['cpu_model']}), torch {env['torch_version']}, "
        f"{env['torch_threads']} thread(s); VAE mid-block attention: "
        f"{result['config'].get('vae_attention', 'exact')}; command: `{env['command']}`",
        "",
        "| attention | stage | size | steps | time (s) | peak (above load) | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in result["runs"]:
        for stage in run.get("stages", []):
            if stage.get("skipped"):
                note = f"skipped: predicted {stage['predicted_seconds']:.0f} s > cap"
                lines.append(f"| {run['attention']} | {stage['stage']} | {stage['width']}x{stage['height']} "
                             f"| - | - | - | {note} |")  # fmt: skip
                continue
            baseline = run.get("baseline_bytes", 0) if env["device"] == "cpu" else 0
            notes = [] if stage["finite"] else ["NOT finite"]
            if "planned_peak_bytes" in stage:
                notes.append(f"planned peak {_fmt_bytes(stage['planned_peak_bytes'])}")
                notes.append(f"savers: {', '.join(stage['savers']) or 'none'}")
            lines.append(
                f"| {run['attention']} | {stage['stage']} | {stage['width']}x{stage['height']} | {stage['steps']} "
                f"| {stage['seconds']:.2f} | {_fmt_bytes(stage['peak_bytes'] - baseline)} | {'; '.join(notes)} |"
            )
        if "error" in run:
            lines.append(f"| {run['attention']} | - | - | - | - | - | error: {run['error']} |")
            continue
        if run.get("total_seconds") is not None:
            lines.append(f"| {run['attention']} | total | | | {run['total_seconds']:.2f} | | |")
    ratios = result.get("stage_ratios") or []
    if ratios:
        lines += ["", "SDPA time / LinFusion time per stage (both measured): "
                  + ", ".join(f"{r['width']}x{r['height']}: {r['ratio']:.2f}x" for r in ratios)]  # fmt: skip
    lines += ["", "CPU peaks are RSS high-water marks above the RSS after loading; CUDA peaks are "
              "max_memory_allocated (weights included)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _stage_ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_attention = {run["attention"]: run for run in runs if "error" not in run}
    if "sdpa" not in by_attention or "linfusion" not in by_attention:
        return []
    ratios = []
    for linear, soft in zip(by_attention["linfusion"]["stages"], by_attention["sdpa"]["stages"]):
        if soft.get("skipped") or linear.get("skipped"):
            break
        ratios.append(
            {"width": soft["width"], "height": soft["height"], "ratio": soft["seconds"] / linear["seconds"]}
        )
    return ratios


def run_from_args(args: argparse.Namespace) -> int:
    from ..pipelines.chain import check_size

    width, height = args.size
    try:
        check_size(width, height)
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1; got {args.steps}")
        if not 0 <= args.guidance < float("inf"):
            raise ValueError(f"--guidance must be a finite number >= 0; got {args.guidance}")
        if args.max_memory:
            parse_size(args.max_memory)
    except ValueError as error:
        raise BenchmarkInputError(str(error)) from error
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = args.dtype if args.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    command = (
        f"linfusion bench highres --model {args.model} --size {width}x{height} --mode {args.mode} "
        f"--attention {args.attention} --steps {args.steps} --guidance {args.guidance} --device {device.type} "
        f"--dtype {dtype} --threads {args.threads} --sdpa-cap-seconds {args.sdpa_cap_seconds} "
        f"--tile-from {args.tile_from} --vae-attention {args.vae_attention}"
        + (f" --max-memory {args.max_memory}" if args.max_memory else "")
    )
    result: dict[str, Any] = {
        "environment": environment(device, args.threads or torch.get_num_threads(), command),
        "config": {
            "model": args.model,
            "mode": args.mode,
            "width": width,
            "height": height,
            "steps": args.steps,
            "guidance": args.guidance,
            "dtype": dtype,
            "vae_attention": args.vae_attention,
            "max_memory": args.max_memory,
        },  # fmt: skip
        "runs": [],
    }
    for attention in args.attention.split(","):
        spec = {
            "model": args.model, "mode": args.mode, "width": width, "height": height, "steps": args.steps,
            "guidance": args.guidance, "seed": args.seed, "prompt": args.prompt, "device": str(device),
            "dtype": dtype, "threads": args.threads, "attention": attention, "tile_from": args.tile_from,
            "cap_seconds": args.sdpa_cap_seconds if attention == "sdpa" else None,
            "vae_attention": args.vae_attention, "max_memory": args.max_memory,
        }  # fmt: skip
        print(f"[highres] {attention} ...", file=sys.stderr, flush=True)
        result["runs"].append(_child(spec, args.timeout))
    result["environment"]["loadavg_end"] = loadavg()
    result["stage_ratios"] = _stage_ratios(result["runs"])
    stem = f"highres-{device.type}-{args.model.replace('/', '_')}-{args.mode}-{width}x{height}"
    stem += "-linear-vae" if args.vae_attention == "linear" else ""
    stem += f"-{args.tag}" if args.tag else ""
    report = markdown_report(result)
    write_results(args.out, stem, result, report)
    print(report)
    return 0 if all("error" not in run for run in result["runs"]) else 1


if __name__ == "__main__":  # one configuration in a fresh process (peaks depend on the heap's history)
    if sys.argv[1:2] == ["--child"]:
        keep_freed_memory()  # the allocator the command line uses, so the figures are what users get
        try:
            print(json.dumps(run_configuration(json.loads(sys.argv[2]))))
        except UserError as error:
            print(json.dumps({"user_error": str(error)}))
            sys.exit(USER_ERROR_STATUS)
