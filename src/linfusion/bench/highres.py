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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..vae_attention import set_vae_attention
from .attention import _environment, _loadavg, _read_status_kib

RANDOM_MODELS = ("random-sd15", "random-sdxl")
# Facts of the published SD VAEs (the same architecture for SD-1.x/2.x and SD-XL; scaling differs).
_SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
_CLIP_BIG_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
}


def random_full_size_pipeline(family: str, dtype: torch.dtype, device: torch.device | str) -> Any:
    """An SD-1.5 or SD-XL pipeline of full size with random weights (``family``: "sd15" or "sdxl").

    Built directly on ``device`` (``meta`` gives the structure without memory). Tokenizers are the offline
    byte-level ones, so prompts are spelled out character by character: fine for timing.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..registry import UNET_CONFIGS
    from ..testing import byte_level_clip_tokenizer

    if family not in ("sd15", "sdxl"):
        raise ValueError(f"family must be 'sd15' or 'sdxl'; got {family!r}")
    tokenizer = byte_level_clip_tokenizer(model_max_length=77)

    def clip(size: dict[str, int], projection: bool) -> Any:
        config = CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=size["hidden_size"], bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **size,
        )  # fmt: skip
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIGS[family])
        if family == "sd15":
            vae = AutoencoderKL(**_SD_VAE, sample_size=512, scaling_factor=0.18215)
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=clip(_CLIP_L, False), tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )  # fmt: skip
        else:
            vae = AutoencoderKL(**_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=False)
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=clip(_CLIP_L, False), text_encoder_2=clip(_CLIP_BIG_G, True),
                tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
            )  # fmt: skip
    return pipe.to(dtype=dtype)


# ---------------------------------------------------------------------- the child: one configuration
def _load(model: str, device: torch.device, dtype: torch.dtype, linfusion: bool) -> Any:
    from ..generate import attach_linfusion, load_pipeline, resolve_model

    if model in RANDOM_MODELS:
        pipe = random_full_size_pipeline(model.split("-", 1)[1], dtype, device)
        if linfusion:
            from ..model import LinFusion

            LinFusion.from_unet(pipe.unet, init="random").to(device=device, dtype=dtype).mount(pipe.unet)
        return pipe
    path = resolve_model(model)
    pipe = load_pipeline(path, device, dtype)
    if linfusion:
        attach_linfusion(pipe, path, "auto")
    return pipe


def _memory_mark(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := current RSS


def _memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return _read_status_kib("VmHWM") * 1024


class _StopChain(Exception):
    pass


def run_configuration(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one chain as ``spec`` says; the per-stage record (in this process)."""
    from ..pipelines import demofusion, plan_stages, sdedit

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    load_start = time.perf_counter()
    pipe = _load(spec["model"], device, dtype, spec["attention"] == "linfusion")
    pipe.set_progress_bar_config(disable=True)
    set_vae_attention(pipe.vae, spec.get("vae_attention", "exact"))
    load_seconds = time.perf_counter() - load_start
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = spec["width"], spec["height"]
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    plan = plan_stages(width, height, native, sdxl=sdxl or spec["mode"] == "demofusion")
    stages: list[dict[str, Any]] = []
    steps_in_stage = [0]
    clock = {"start": 0.0}
    cap = spec.get("cap_seconds")
    memory_plan = None
    if spec.get("max_memory"):
        from ..generate import plan_memory

        sizes = [(stage.width, stage.height) for stage in plan]
        encodes = [stage.strength is not None for stage in plan]
        memory_plan = plan_memory(pipe, sizes, encodes, spec["max_memory"], spec["guidance"], quiet=False)

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
                "peak_bytes": _memory_peak(device),
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
        _memory_mark(device)
        clock["start"] = time.perf_counter()

    run = sdedit if spec["mode"] == "sdedit" else demofusion
    baseline = _memory_peak(device) if device.type == "cuda" else _read_status_kib("VmRSS") * 1024
    _memory_mark(device)
    total_start = clock["start"] = time.perf_counter()
    completed = True
    try:
        with torch.inference_mode():
            run(
                pipe, spec["prompt"], width, height, num_inference_steps=spec["steps"],
                guidance_scale=spec["guidance"], generator=torch.Generator(device).manual_seed(spec["seed"]),
                callback_on_step_end=on_step, on_stage_end=on_stage_end, exact_vae_tiling_from=spec["tile_from"],
                memory_plan=memory_plan,
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
def _child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads") or os.cpu_count())}
    command = [sys.executable, "-m", "linfusion.bench.highres", "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else expired.stderr or ""
        return {**spec, "error": f"timed out after {timeout:.0f} s", "stages": _finished_stages(stderr)}
    if done.returncode != 0:
        return {**spec, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _finished_stages(stderr: str) -> list[dict[str, Any]]:
    """The stage records a child printed before it was stopped."""
    marker = '{"stage_done": '
    return [json.loads(line)["stage_done"] for line in stderr.splitlines() if line.startswith(marker)]


def _fmt_bytes(size: int | None) -> str:
    from ..planner import format_size

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
    width, height = (int(v) for v in args.size.lower().split("x"))
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = args.dtype if args.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    command = (
        f"linfusion bench highres --model {args.model} --size {args.size} --mode {args.mode} "
        f"--attention {args.attention} --steps {args.steps} --guidance {args.guidance} --device {device.type} "
        f"--dtype {dtype} --threads {args.threads} --sdpa-cap-seconds {args.sdpa_cap_seconds} "
        f"--tile-from {args.tile_from} --vae-attention {args.vae_attention}"
        + (f" --max-memory {args.max_memory}" if args.max_memory else "")
    )
    result: dict[str, Any] = {
        "environment": _environment(device, args.threads or torch.get_num_threads(), command),
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
    result["environment"]["loadavg_end"] = _loadavg()
    result["stage_ratios"] = _stage_ratios(result["runs"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"highres-{device.type}-{args.model.replace('/', '_')}-{args.mode}-{width}x{height}"
    stem += "-linear-vae" if args.vae_attention == "linear" else ""
    stem += f"-{args.tag}" if args.tag else ""
    report = markdown_report(result)
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", report)):
        partial = out / f".{stem}{suffix}.partial"
        partial.write_text(text)
        partial.replace(out / f"{stem}{suffix}")
    print(report)
    return 0 if all("error" not in run for run in result["runs"]) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(run_configuration(json.loads(argv[1]))))
        return 0
    from .cli import add_highres_arguments

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_highres_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
