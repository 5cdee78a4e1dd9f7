"""Run as a script in a fresh process: one UNet call (plain or banded) of the bundled model's UNet with its
LinFusion weights, CFG batch, on the CPU, one thread; print as JSON the RSS high-water mark above the
baseline (weights and inputs loaded, every kernel used once by a small warm-up call), the wall time and
the cost model's prediction.

    python tests/banded_unet_probe.py LATENT_SIZE MODE [BAND_MIB]

MODE: ``plain``, ``banded`` (store on the CPU with the UNet) or ``banded-store`` (a separate store, which on
a CPU-only machine is also RAM: the RSS then holds both of the cost model's sides). A fresh process per
measurement matters: RSS high-water marks depend on the heap's history.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

import torch

from linfusion import LinFusion
from linfusion.bundled import MODEL_DIR, load_pipeline
from linfusion.patches.banded_unet import apply_banded_unet, banded_unet_cost


def rss(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def main(latent: int, mode: str, band_mib: int = 16) -> dict:
    torch.set_num_threads(1)
    pipe = load_pipeline(MODEL_DIR)
    unet, tokens = pipe.unet, pipe.tokenizer.model_max_length
    LinFusion.from_pretrained(MODEL_DIR / "linfusion").to(torch.float32).mount(unet)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, latent, latent, generator=generator)
    context = torch.randn(2, tokens, unet.config.cross_attention_dim, generator=generator)
    band_bytes = band_mib * 2**20
    store = "cpu" if mode == "banded-store" else None
    patch = apply_banded_unet(unet, band_bytes=band_bytes, store_device=store) if mode != "plain" else None
    cost = banded_unet_cost(
        unet,
        latent,
        latent,
        dtype=torch.float32,
        batch=2,
        band_bytes=band_bytes,
        store_on_host=store is not None,
        vae_scale_factor=1,
        context_tokens=tokens,
    )
    with torch.no_grad():  # first use of each kernel maps its code and caches: not activation memory
        unet(sample[:, :, :32, :32], torch.tensor(500), encoder_hidden_states=context)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the high-water mark to the current RSS
    baseline = rss("VmRSS:")
    start = time.perf_counter()
    with torch.no_grad():
        out = unet(sample, torch.tensor(500), encoder_hidden_states=context).sample
    seconds = time.perf_counter() - start
    measured = rss("VmHWM:") - baseline
    if patch is not None:
        patch.remove()
    return {
        "latent": latent,
        "mode": mode,
        "band_bytes": band_bytes,
        "measured": measured,
        "seconds": seconds,
        "device_peak": cost.device_peak,
        "host_peak": cost.host_peak,
        "output_abs_mean": out.abs().mean().item(),
    }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), sys.argv[2], *(int(a) for a in sys.argv[3:4]))))
