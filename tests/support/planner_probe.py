"""Run as a script in a fresh process: plan one stage of a pipeline (a tiny SD-1.5-shaped one, or the
bundled model with its LinFusion weights), run it, and print the plan's activation estimate and the
measured RSS peak above the baseline (weights loaded), as JSON.

A fresh process per measurement matters: RSS high-water marks depend on the heap's history. The probe
sets glibc up as the command line does (:func:`linfusion.runtime.keep_freed_memory`, unless
``LINFUSION_MALLOC_TUNING=0``, and freed memory returned when the plan is tight:
:func:`linfusion.app.execute.returns_freed_memory`), because the plan budgets the command line's process: its
peak is what the estimate must match.
"""

from __future__ import annotations

import ctypes
import json
import sys
from types import SimpleNamespace

import torch

from linfusion import LinFusion
from linfusion.app.execute import returns_freed_memory
from linfusion.io import parse_size
from linfusion.patches.stage import apply_savers
from linfusion.planner import MemoryPlanner
from linfusion.runtime import keep_freed_memory, return_freed_memory
from linfusion.testing import tiny_pipeline


def rss(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def main(size: int, activation_budget: str, model: str = "tiny") -> dict:
    keep_freed_memory()  # before the model's allocations, as linfusion.cli.main does
    torch.set_num_threads(1)
    if model == "bundled":
        from linfusion.bundled import MODEL_DIR, load_pipeline

        pipe = load_pipeline(MODEL_DIR)
        LinFusion.from_pretrained(MODEL_DIR / "linfusion").to(torch.float32).mount(pipe.unet)
    else:
        pipe = tiny_pipeline("sd15")
        LinFusion.construct_for(pipe, load_pretrained=False)
    planner = MemoryPlanner(pipe)
    budget = parse_size(activation_budget) + planner.weights()
    stage = planner.plan_stage(size, size, budget)
    tight = returns_freed_memory(SimpleNamespace(budget=budget, stages=[stage]), torch.device("cpu"))
    if tight:
        return_freed_memory()  # what the command line does for a plan with no room for a fragmented heap
    latents, context, _ = planner.unet_inputs(size, size, 2)
    latents, context = torch.randn(latents.shape), torch.randn(context.shape)
    vae_latents = torch.randn(1, 4, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    extra = {"timestep": torch.tensor(999), "encoder_hidden_states": context}
    peaks = {}
    with torch.no_grad(), apply_savers(pipe, stage.savers):  # whatever the plan chose, as a run applies it
        small = (
            pipe.vae_scale_factor * 8
        )  # first use of each kernel maps its code and caches: not activations
        warm_latents, warm_context, _ = planner.unet_inputs(small, small, 2)
        pipe.unet(torch.randn(warm_latents.shape), timestep=torch.tensor(999),
                  encoder_hidden_states=torch.randn(warm_context.shape))  # fmt: skip
        pipe.vae.decode(torch.randn(1, 4, 8, 8))
        for phase, run in (
            ("unet", lambda: pipe.unet(latents, **extra)),
            ("vae", lambda: pipe.vae.decode(vae_latents)),
        ):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset the high-water mark to the current RSS
            baseline = rss("VmRSS:")
            run()
            peaks[phase] = rss("VmHWM:") - baseline
    measured = max(peaks.values())
    estimate = max(stage.unet_activations, stage.vae_activations)
    return {
        "model": model,
        "size": size,
        "savers": stage.savers.names(),
        "banded_unet": stage.savers.banded_unet,
        "tiled_vae": stage.savers.tiled_vae,
        "estimate": estimate,
        "measured": measured,
        "freed_memory_returned": tight,
        "unet_estimate": stage.unet_activations,
        "unet_measured": peaks["unet"],
        "vae_estimate": stage.vae_activations,
        "vae_measured": peaks["vae"],
    }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), sys.argv[2], *sys.argv[3:4])))
