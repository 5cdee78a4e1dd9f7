"""Run as a script in a fresh process: one PixArt-Sigma-wide transformer call (width 1152, 2 of its 28
blocks, LinFusion mounted, float32, both CFG branches) on the CPU, plain or banded, and print the
planner's estimate of its activations and the measured RSS peak above the baseline, as JSON.

A fresh process per measurement: RSS high-water marks depend on the heap's history. glibc is set up as
the command line sets it up (:func:`linfusion.runtime.keep_freed_memory`).
"""

from __future__ import annotations

import ctypes
import json
import sys
from types import SimpleNamespace

import torch

from linfusion import LinFusion
from linfusion.patches.banded_dit import apply_banded_dit, banded_dit_cost
from linfusion.planner import MemoryPlanner, Savers
from linfusion.runtime import keep_freed_memory

BAND_BYTES = 32 * 2**20


def rss(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def main(size: int, mode: str) -> dict:
    from diffusers import AutoencoderKL, PixArtTransformer2DModel

    from linfusion.registry import SD_VAE_CONFIG, TRANSFORMER_CONFIGS

    keep_freed_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(**{**TRANSFORMER_CONFIGS["pixart-sigma"], "num_layers": 2}).eval()
    LinFusion.from_transformer(transformer).mount(transformer)
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE_CONFIG)
    pipe = SimpleNamespace(transformer=transformer, vae=vae, vae_scale_factor=8,
                           tokenizer=SimpleNamespace(model_max_length=300))  # fmt: skip
    planner = MemoryPlanner(pipe)
    if mode == "plain":
        estimate = planner.unet_activations(size, size, Savers())
    else:
        cost = banded_dit_cost(planner.meta_unet(), size, size, dtype=torch.float32, batch=2,
                               band_bytes=BAND_BYTES, store_on_host=False)  # fmt: skip
        estimate = planner.with_overhead(cost.device_peak)
    latents, captions, extra = planner.unet_inputs(size, size, 2)
    latents, captions = torch.randn(latents.shape), torch.randn(captions.shape)
    extra = {"timestep": torch.tensor([999, 999]), "encoder_attention_mask": torch.ones(2, 300),
             "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}  # fmt: skip
    patch = apply_banded_dit(transformer, band_bytes=BAND_BYTES) if mode == "banded" else None
    with torch.no_grad():
        small = torch.randn(2, 4, 16, 16)  # first use of each kernel maps its code and caches
        transformer(small, encoder_hidden_states=captions, **extra)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the high-water mark to the current RSS
        baseline = rss("VmRSS:")
        transformer(latents, encoder_hidden_states=captions, **extra)
        measured = rss("VmHWM:") - baseline
    if patch is not None:
        patch.remove()
    return {"size": size, "mode": mode, "estimate": estimate, "measured": measured}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), sys.argv[2])))
