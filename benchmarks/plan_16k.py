"""The memory plans of 16K chains on consumer GPUs: full-size SD-1.5 in 12 GB and SD-XL in 16 GB of device
memory with at most 64 GiB of host memory, planned without a GPU or weights (``linfusion plan``).

For each model and size: the last stage's device and host peak, the savers, the FLOPs of the whole chain
against the plain computation's, the bytes moved between host and device, a time predicted on an H100
(FLOPs over 35 % of the published peak plus the transfers over its PCIe 5.0 link at 80 % of 64 GB/s, not
overlapped: a prediction, not a measurement), and how long the plan took here. Writes
``benchmarks/results/plan-16k.{json,md}``.

    python benchmarks/plan_16k.py
"""

from __future__ import annotations

import sys
import time

import torch

from linfusion.app.plan import PlanRequest, make_plan
from linfusion.app.timing import EFFICIENCY, GPU_LINKS, GPUS, LINK_EFFICIENCY, LINKS
from linfusion.bench.harness import environment, write_results
from linfusion.io import format_size, parse_size

CASES = [("random-sd15", "12GB"), ("random-sdxl", "16GB")]
VAE_ATTENTION = ("exact", "linear")  # the VAE's own softmax mid-block attention, or the linear kernel
SIZES = [(16384, 8192), (8192, 16384), (16384, 16384)]
STEPS = 25
HOST_BUDGET = 64 * 2**30  # the host memory these results were planned with


def main() -> int:
    torch.set_num_threads(1)
    records = []
    for model, budget in CASES:
        for width, height in SIZES:
            for vae_attention in VAE_ATTENTION:
                start = time.perf_counter()
                request = PlanRequest(model=model, width=width, height=height, max_memory=parse_size(budget),
                                      host_memory=HOST_BUDGET, steps=STEPS, vae_attention=vae_attention)  # fmt: skip
                data = make_plan(request).to_json()
                seconds = time.perf_counter() - start
                data.update(budget=budget, plan_seconds=seconds, size=f"{width}x{height}")
                records.append(data)
                print(
                    f"{model} {width}x{height} {vae_attention}: fits {data['fits']}, {seconds:.1f} s",
                    flush=True,
                )
    lines = [
        "# 16K on one consumer GPU: memory plans (no GPU, no weights)",
        "",
        f"`python benchmarks/plan_16k.py` ({STEPS} steps at the base stage, SDEdit chain, fp16, CFG, LinFusion "
        "mounted, full-size architectures with random weights built on the meta device; host budget 64 GiB). "
        f"Predicted times: FLOPs over {EFFICIENCY:.0%} of the {GPUS['h100'].name}'s published fp16 peak, plus "
        f"the bytes moved between host and device over its {GPU_LINKS['h100']} link at {LINK_EFFICIENCY:.0%} of "
        f"{LINKS[GPU_LINKS['h100']] / 1e9:.0f} GB/s, not overlapped with compute (predictions, not measurements). "
        "VAE attention: the VAE's own "
        "softmax mid-block attention (exact, quadratic in the tokens) or LinFusion's linear kernel on it "
        "(`--vae-attention linear`). Plan time: this 2-core machine, shared with other work.",
        "",
        "| model | size | VAE attention | device budget | fits | device peak | host peak | savers of the last stage | "
        "FLOPs (chain) | x plain | moved host<->device | predicted H100 | of it transfers | plan time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data in records:
        last = data["stages"][-1]
        plain = sum(stage["plain_flops"] for stage in data["stages"])
        predicted = sum(stage["predicted_seconds"] for stage in data["stages"])
        moved = sum(stage["transfer_bytes"] for stage in data["stages"])
        moving = sum(stage["transfer_seconds"] for stage in data["stages"])
        lines.append(
            f"| {data['model']} | {data['size']} | {data['vae_attention']} | {data['budget']} | {'yes' if data['fits'] else 'NO'} | "
            f"{format_size(data['device_peak_bytes'])} | {format_size(data['host_peak_bytes'])} | "
            f"{', '.join(last['savers']) or 'none'} | {data['flops']:.3g} | {data['flops'] / plain:.2f} | "
            f"{format_size(moved)} | {predicted:.0f} s | {moving:.0f} s | {data['plan_seconds']:.0f} s |"
        )
    result = {
        "environment": environment(torch.device("cpu"), 1, "python benchmarks/plan_16k.py"),
        "plans": records,
    }
    paths = write_results("benchmarks/results", "plan-16k", result, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {paths['json']} and {paths['md']}")
    return 0 if all(data["fits"] for data in records) else 1


if __name__ == "__main__":
    sys.exit(main())
