"""Measures the VAE figures in docs/comfyui.md on the tiny ComfyUI VAE of the tests (CPU, float32).

``python tools/measure_vae.py accuracy``: ComfyUI's untiled decode vs its VAEDecodeTiled and vs
LinFusionVAEDecode on the same latents. ``python tools/measure_vae.py memory MODE SIDE``: the peak
resident memory of one decode (MODE: comfy, comfy-tiled, ours, ours-smallest) in a fresh process.
Run from integrations/comfyui with the test venv's python.
"""

from __future__ import annotations

import importlib.util
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import comfy.cli_args  # noqa: E402
from tiny_nodes import tiny_models  # noqa: E402

comfy.cli_args.args.cwd = tempfile.mkdtemp(prefix="linfusion-measure-")  # ComfyUI's folders go there
tiny_models.use_cpu()


def load_pack():
    spec = importlib.util.spec_from_file_location("linfusion_comfyui", HERE.parent / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["linfusion_comfyui"] = module
    spec.loader.exec_module(module)
    return module


def smooth_latents(vae, side: int) -> torch.Tensor:
    """Latents of a smooth picture (encoded by ComfyUI's VAE), so differences show as on real images."""
    y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    image = torch.stack([x, y, 0.5 + 0.4 * torch.sin(6 * x + 4 * y)])[None] * 2 - 1
    with torch.inference_mode():
        return vae.first_stage_model.quant_conv(vae.first_stage_model.encoder(image))[:, :4].clone()


def accuracy(side: int = 512) -> None:
    pack = load_pack()
    vae = tiny_models.comfy_vae(tiny_models.diffusers_vae())
    latents = smooth_latents(vae, side)
    with torch.inference_mode():
        untiled = vae.decode(latents)
        results = {
            "VAEDecodeTiled tile 512 (default)": vae.decode_tiled(latents, tile_x=64, tile_y=64),
            "VAEDecodeTiled tile 320 (smallest)": vae.decode_tiled(latents, tile_x=40, tile_y=40),
            "LinFusionVAEDecode band 1 MiB": pack.nodes.LinFusionVAEDecode().decode(
                {"samples": latents}, vae, band_mb=1)[0],
        }  # fmt: skip
    print(f"{side}x{side} image, differences to ComfyUI's untiled VAEDecode (image values in [0, 1]):")
    for name, image in results.items():
        difference = (image - untiled).abs()
        levels = ((image * 255).round() != (untiled * 255).round()).float().mean().item()
        print(f"  {name}: max {difference.max():.2e}, mean {difference.mean():.2e}, "
              f"8-bit values changed {100 * levels:.3f} %")  # fmt: skip


def memory(mode: str, side: int) -> None:
    pack = load_pack()
    vae = tiny_models.comfy_vae(tiny_models.diffusers_vae())
    latents = torch.randn(1, 4, side // 8, side // 8)
    model = pack.vae_convert.diffusers_vae(vae)
    with torch.inference_mode():  # warm-up at a small size, so the peak below is the decode's
        vae.decode(latents[..., :8, :8])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    decode = pack.nodes.LinFusionVAEDecode().decode
    start = time.perf_counter()
    with torch.inference_mode():
        if mode == "comfy":
            vae.decode(latents)
        elif mode == "comfy-tiled":
            vae.decode_tiled(latents, tile_x=64, tile_y=64)
        elif mode == "ours":
            decode({"samples": latents}, vae, band_mb=64)
        elif mode == "ours-smallest":
            _, smallest = pack.nodes.plan_report(side, side, "decode", "float32", 1, 64, "exact", "vae device",
                                                 0, vae)  # fmt: skip
            decode({"samples": latents}, vae, band_mb=64, store_limit_mb=smallest)
            mode += f" ({smallest} MiB store)"
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    output = 3 * side * side * 4 * 2  # the float32 image, as the decode returns it and as ComfyUI keeps it
    print(f"{mode} {side}x{side}: peak RSS {(peak - before) / 2**20:,.0f} MiB above the loaded VAE "
          f"(the output alone {output / 2**20:,.0f} MiB), {seconds:.1f} s")  # fmt: skip
    del model


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "accuracy":
        accuracy(*map(int, sys.argv[2:]))
    else:
        memory(sys.argv[2], int(sys.argv[3]))
