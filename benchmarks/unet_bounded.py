"""Bounded-memory exact UNet (``linfusion.patches.banded_unet``) against the plain UNet, on the CPU.

For each model and latent size, three fresh processes run one CFG-batch UNet call each way: ``plain``,
``banded`` (store on the CPU with the UNet) and ``banded-store`` (a separate store: the path a GPU takes,
here RAM on both sides). Each process warms up on a small input, records the RSS high-water mark of its
first full-size call above the baseline (weights loaded; default allocator settings) and the median wall
time of ``--runs`` calls, one thread. The parent compares the outputs (max abs difference to ``plain``)
and adds the cost model's FLOPs and predicted bytes.

Models: ``small-sd15`` (the SD-1.5 layout at a fifth of the width, random weights, random LinFusion
layers) and ``bundled`` (the bundled model's UNet with its LinFusion weights).

    python benchmarks/unet_bounded.py                       # JSON + Markdown in benchmarks/results/
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
MODES = ("plain", "banded", "banded-store")
DEFAULT_PLAN = "small-sd15:64,128,192;bundled:128,256,384"


def build(model: str) -> tuple[Any, int]:
    """The UNet (fp32, LinFusion mounted) and its text length."""
    from linfusion import LinFusion

    if model == "bundled":
        from linfusion.bundled import MODEL_DIR, load_pipeline

        pipe = load_pipeline(MODEL_DIR)
        LinFusion.from_pretrained(MODEL_DIR / "linfusion").to(torch.float32).mount(pipe.unet)
        return pipe.unet, pipe.tokenizer.model_max_length
    if model == "small-sd15":
        from diffusers import UNet2DConditionModel

        from linfusion.registry import UNET_CONFIGS

        torch.manual_seed(0)
        config = {
            **UNET_CONFIGS["sd15"],
            "block_out_channels": [64, 128, 256, 256],
            "cross_attention_dim": 192,
        }
        unet = UNet2DConditionModel(**config).eval()
        LinFusion.from_unet(unet).mount(unet)
        return unet, 77
    raise ValueError(f"unknown model {model!r}: small-sd15 or bundled")


def _rss(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def worker(model: str, latent: int, mode: str, runs: int, band_mib: int, output: str) -> dict[str, Any]:
    from linfusion.patches.banded_unet import apply_banded_unet

    torch.set_num_threads(1)
    unet, tokens = build(model)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, latent, latent, generator=generator)
    context = torch.randn(2, tokens, unet.config.cross_attention_dim, generator=generator)
    timestep = torch.tensor(500)
    if mode != "plain":
        store = "cpu" if mode == "banded-store" else None
        apply_banded_unet(unet, band_bytes=band_mib * MIB, store_device=store)
    with torch.no_grad():
        unet(sample[:, :, :32, :32], timestep, encoder_hidden_states=context)  # map every kernel once
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the high-water mark restarts at the current RSS
        baseline = _rss("VmRSS:")
        seconds = []
        for index in range(runs):
            start = time.perf_counter()
            out = unet(sample, timestep, encoder_hidden_states=context).sample
            seconds.append(time.perf_counter() - start)
            if index == 0:
                peak = _rss("VmHWM:") - baseline
                torch.save(out, output)
    return {"peak_rss": peak, "seconds": seconds, "median_seconds": statistics.median(seconds)}


def run_worker(model: str, latent: int, mode: str, runs: int, band_mib: int, output: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        model,
        str(latent),
        mode,
        str(runs),
        str(band_mib),
        str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(model: str, latent: int, runs: int, band_mib: int, scratch: Path) -> dict[str, Any]:
    from linfusion.patches.banded_unet import banded_unet_cost

    unet, tokens = build(model)
    record: dict[str, Any] = {"model": model, "latent": latent, "batch": 2, "band_mib": band_mib}
    outputs = {}
    for mode in MODES:
        path = scratch / f"{model}-{latent}-{mode}.pt"
        record[mode] = run_worker(model, latent, mode, runs, band_mib, path)
        outputs[mode] = torch.load(path)
        print(f"{model} latent {latent} {mode}: {record[mode]}", file=sys.stderr, flush=True)
    for mode in MODES[1:]:
        record[mode]["max_abs_diff"] = (outputs[mode] - outputs["plain"]).abs().max().item()
        cost = banded_unet_cost(unet, latent, latent, dtype=torch.float32, batch=2, band_bytes=band_mib * MIB,
                                store_on_host=mode == "banded-store", vae_scale_factor=1,
                                context_tokens=tokens)  # fmt: skip
        record[mode]["predicted_device"] = cost.device_peak
        record[mode]["predicted_host"] = cost.host_peak
        record["flops"] = cost.flops
        record["plain_flops"] = cost.plain_flops
    record["output_abs_max"] = outputs["plain"].abs().max().item()
    return record


def _mib(value: float) -> str:
    return f"{value / MIB:,.0f}"


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        "# Bounded-memory exact UNet on the CPU: banded vs plain",
        "",
        f"Command: `{env['command']}`; {env['processor']}, {env['cores']} cores, torch {env['torch']}, "
        f"one thread per process, load average {env['load_start']} at the start and {env['load_end']} at the "
        "end (other work shares the machine). CFG batch 2, fp32, band budget "
        f"{result['records'][0]['band_mib']} MiB. Peak RSS: high-water mark of the first full-size call "
        "above the baseline (weights loaded, kernels warmed up), default allocator settings; predicted: the "
        "cost model's device + host bytes (live tensors). Time: median of the runs.",
        "",
        "| model | latent | path | max abs diff vs plain | peak RSS (MiB) | predicted (MiB) | median s | "
        "time vs plain | GFLOP (banded / plain) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        plain = r["plain"]
        for mode in MODES:
            m = r[mode]
            diff = "-" if mode == "plain" else f"{m['max_abs_diff']:.1e}"
            predicted = "-" if mode == "plain" else _mib(m["predicted_device"] + m["predicted_host"])
            ratio = m["median_seconds"] / plain["median_seconds"]
            flops = f"{r['flops'] / 1e9:,.0f} / {r['plain_flops'] / 1e9:,.0f}" if mode == "plain" else ""
            lines.append(
                f"| {r['model']} | {r['latent']} | {mode} | {diff} | {_mib(m['peak_rss'])} | {predicted} | "
                f"{m['median_seconds']:.2f} | {ratio:.2f}x | {flops} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=DEFAULT_PLAN, help="MODEL:LATENT,...;MODEL:LATENT,...")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--band-mib", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        for part in args.plan.split(";"):
            model, latents = part.split(":")
            for latent in (int(value) for value in latents.split(",")):
                records.append(measure(model, latent, args.runs, args.band_mib, Path(scratch)))
    with open("/proc/cpuinfo") as cpuinfo:
        names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    processor = names[0] if names else platform.processor()
    command = "python benchmarks/unet_bounded.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "environment": {
            "command": command.strip(),
            "date": datetime.date.today().isoformat(),
            "processor": processor,
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "load_start": f"{load_start:.1f}",
            "load_end": f"{os.getloadavg()[0]:.1f}",
        },
        "records": records,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"unet-bounded-{args.tag}"
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", markdown(result))):
        partial = out / f".{stem}{suffix}.partial"
        partial.write_text(text)
        partial.replace(out / f"{stem}{suffix}")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model, latent, mode, runs, band_mib, output = sys.argv[2:8]
        print(json.dumps(worker(model, int(latent), mode, int(runs), int(band_mib), output)))
    else:
        sys.exit(main())
