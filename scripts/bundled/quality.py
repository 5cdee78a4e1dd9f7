"""Quality of the bundled LinFusion student against its teacher (the report in docs/quality.md).

For held-out captions with fixed seeds, three variants of the same pipeline generate images: the
teacher (its own softmax self-attention), the distilled student (LinFusion weights of the model folder)
and a control student with untrained (random) LinFusion modules, which shows whether the measures can
tell a good student from a bad one. Measures, at the native size and at 2x and 4x (cross-resolution
generalization, the paper's claim):

- prompt adherence: the bundled classifier's per-attribute accuracies against each caption (strict,
  per object at its slot), summarized as ``adherence`` = mean of background, colour, shape, position;
- fidelity to the teacher on the same seeds: PSNR and SSIM of the decoded images;
- time per image (batched generation, this process's threads).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from linfusion.bundled import classifier as classifier_lib
from linfusion.bundled import shapes
from linfusion.model import denoiser_of

from . import evaluate

ADHERENCE_KEYS = ("background", "colour", "shape", "position")
VARIANTS = ("teacher", "student", "random")


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 (N, H, W, C) arrays; identical images give +inf."""
    error = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0**2 / error)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7, sigma: float = 1.5) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004) of uint8 (N, H, W, C) arrays: Gaussian window, C1 = (0.01 L)^2,
    C2 = (0.03 L)^2, averaged over the valid window positions and the channels. ``window`` 7 suits 32 px."""
    x = torch.from_numpy(a).double().permute(0, 3, 1, 2)
    y = torch.from_numpy(b).double().permute(0, 3, 1, 2)
    channels = x.shape[1]
    offsets = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = torch.outer(g, g) / torch.outer(g, g).sum()
    kernel = kernel.expand(channels, 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.mean(dim=(1, 2, 3)).numpy()


def adherence(scores: dict[str, float]) -> float:
    return float(np.mean([scores[key] for key in ADHERENCE_KEYS]))


def quality_scenes(n: int, start: int = 20_000) -> list[shapes.Scene]:
    """``n`` held-out scenes of 1 to 3 objects (seeds apart from the teacher's gate and loss scenes)."""
    return evaluate.heldout_scenes(n, n_objects=None, start=start)


def make_variant(pipe: Any, name: str, distilled: Any) -> Any:
    """Mount the LinFusion modules ``name`` asks for on ``pipe`` (none for the teacher)."""
    from linfusion import LinFusion

    if name == "teacher":
        return None
    denoiser = denoiser_of(pipe)
    if name == "student":
        return distilled.mount(denoiser)
    torch.manual_seed(0)
    random = LinFusion.from_unet(denoiser, init="random")
    return random.mount(denoiser)


def generate_variant(
    pipe: Any,
    distilled: Any,
    name: str,
    prompts: Sequence[str],
    scale: int,
    steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
    batch_size: int = 50,
    chain: bool = False,
) -> tuple[np.ndarray, float]:
    """Images of one variant at ``scale`` x the native size, and the seconds per image.

    ``chain``: above the native size, generate through the SDEdit chain (``linfusion.pipelines.sdedit``,
    one image at a time, image i from a generator seeded with ``seed + i``) instead of directly.
    """
    size = denoiser_of(pipe).config.sample_size * pipe.vae_scale_factor * scale
    mounted = make_variant(pipe, name, distilled)
    try:
        start = time.perf_counter()
        if chain and scale > 1:
            images = chain_images(pipe, list(prompts), size, steps, guidance_scale, seed)
        else:
            images = evaluate.generate(pipe, list(prompts), seed, steps, guidance_scale, size, batch_size)
        return images, (time.perf_counter() - start) / len(prompts)
    finally:
        if mounted is not None:
            mounted.remove()


def chain_images(
    pipe: Any, prompts: list[str], size: int, steps: int, guidance_scale: float, seed: int = 0
) -> np.ndarray:
    """uint8 (N, size, size, 3) images made by the SDEdit chain from the native size."""
    from linfusion.pipelines import sdedit

    images = [
        np.asarray(
            sdedit(
                pipe,
                prompt,
                size,
                size,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed + i),
            ).convert("RGB")
        )
        for i, prompt in enumerate(prompts)
    ]
    return np.stack(images)


def score_variant(
    images: np.ndarray, scenes: Sequence[shapes.Scene], teacher: np.ndarray | None, classifier: Any = None
) -> dict[str, float]:
    """Classifier scores and adherence; PSNR / SSIM against the teacher's images when given."""
    scores = classifier_lib.score(images, list(scenes), classifier)
    record = {**scores, "adherence": adherence(scores)}
    if teacher is not None:
        record["psnr_vs_teacher"] = float(np.mean(np.minimum(psnr(images, teacher), 99.0)))
        record["ssim_vs_teacher"] = float(np.mean(ssim(images, teacher)))
    return record


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the numbers it compares."""
    native, largest = results["1x"], results[max(results, key=lambda key: int(key[:-1]))]
    checks = {
        "student_native_vs_teacher": {
            "student": native["student"]["adherence"],
            "teacher": native["teacher"]["adherence"],
            "needed_ratio": 0.95,
        },
        "student_at_largest_vs_teacher": {
            "student": largest["student"]["adherence"],
            "teacher": largest["teacher"]["adherence"],
            "needed_ratio": 1.0,
        },
        "random_clearly_worse": {
            "random_psnr": native["random"]["psnr_vs_teacher"],
            "student_psnr": native["student"]["psnr_vs_teacher"],
            "random_ssim": native["random"]["ssim_vs_teacher"],
            "student_ssim": native["student"]["ssim_vs_teacher"],
            "random_adherence": native["random"]["adherence"],
            "student_adherence": native["student"]["adherence"],
        },
    }
    for key in ("student_native_vs_teacher", "student_at_largest_vs_teacher"):
        check = checks[key]
        check["ratio"] = check["student"] / check["teacher"] if check["teacher"] else math.inf
        check["met"] = check["ratio"] >= check["needed_ratio"]
    random_check = checks["random_clearly_worse"]
    # Measured: on these captions self-attention barely changes *what* is drawn at the native size (random
    # modules keep most of the adherence), but it changes *how*: the fidelity to the teacher separates them.
    random_check["met"] = (
        random_check["student_psnr"] - random_check["random_psnr"] >= 3.0
        and random_check["random_ssim"] < random_check["student_ssim"]
    )
    return checks
