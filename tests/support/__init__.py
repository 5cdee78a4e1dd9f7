"""Helpers shared by the tests: deterministic tiny-pipeline runs, hand-written checkpoints, random images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from linfusion.registry import attention_signature

SIZE = 32


def random_image(seed: int = 0, size: int = SIZE) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def run(pipe: Any, task: str = "text2img", seed: int = 0, steps: int = 2, **extra: Any) -> np.ndarray:
    """One seeded generation at 32x32 (latents 16x16), returned as a float array in [0, 1]."""
    kwargs: dict[str, Any] = {
        "prompt": "a red circle on a blue background",
        "num_inference_steps": steps,
        "output_type": "np",
        "generator": torch.Generator().manual_seed(seed),
    }
    if task == "text2img":
        kwargs.update(height=SIZE, width=SIZE)
    elif task == "img2img":
        kwargs.update(image=random_image(seed), strength=0.75)
    elif task == "inpaint":
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[:, SIZE // 2 :] = 255
        kwargs.update(
            image=random_image(seed), mask_image=Image.fromarray(mask), strength=1.0, height=SIZE, width=SIZE
        )
    else:
        raise ValueError(task)
    kwargs.update(extra)
    return pipe(**kwargs).images


def write_published_folder(
    folder: Path, unet: torch.nn.Module, legacy: bool = False
) -> dict[str, torch.Tensor]:
    """A checkpoint folder written by hand exactly as published, fp16 tensors; returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(7)
    tensors: dict[str, torch.Tensor] = {}
    modules_list = []
    for index, (path, width, heads) in enumerate(attention_signature(unet)):
        if legacy:
            modules_list.append([path, width, heads])
        else:
            modules_list.append(
                {"module_name": path, "dim_n": width, "heads": heads, "projection_mid_dim": None}
            )
        shapes = {
            "to_q.weight": (width, width),
            "to_k.weight": (width, width),
            "to_v.weight": (width, width),
            "to_out.0.weight": (width, width),
            "to_out.0.bias": (width,),
        }
        for prefix in ("to_q_", "to_k_"):
            shapes |= {
                f"{prefix}.0.weight": (width, width),
                f"{prefix}.0.bias": (width,),
                f"{prefix}.1.weight": (width,),
                f"{prefix}.1.bias": (width,),
                f"{prefix}.3.weight": (width, width),
                f"{prefix}.3.bias": (width,),
            }
        for key, shape in shapes.items():
            tensors[f"{index}.{key}"] = (torch.randn(shape, generator=generator) * 0.1).half()
    config = {"_class_name": "StableMamba" if legacy else "LinFusion", "_diffusers_version": "0.30.0"}
    config["modules_list"] = modules_list
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    return tensors


def perturbed_vae(scale: float = 0.05) -> Any:
    """The tiny VAE with every weight moved off its initial value (GroupNorm affine included)."""
    from linfusion.testing import tiny_vae

    vae = tiny_vae()
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)
    return vae
