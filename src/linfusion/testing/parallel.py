"""Self-checks run in several processes: the parallel result against the single-process one, on tiny models.

Used by ``tests/parallel`` and ``benchmarks/parallel.py``. :func:`spawn` starts ``world`` processes
(gloo, CPU, one thread each) running :func:`worker`, which runs the named cases and writes one JSON per
rank; every case computes the single-process reference itself (same seeds) and reports the max abs
difference of the parallel result, plus the bytes its collectives moved.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_gloo(rank: int, world: int, port: int, timeout_s: float = 60.0) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )


def spawn(cases: list[dict[str, Any]], world: int, folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Run ``cases`` on ``world`` gloo processes; returns the results, each diff the max over ranks.

    Processes are forked where the platform allows (the parent's imports are reused: ~1 s instead of
    ~8 s per group on 2 cores); the parent must not have a process group of its own.
    """
    import multiprocessing

    import torch.multiprocessing as mp

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    mp.start_processes(
        worker, args=(world, free_port(), cases, str(folder)), nprocs=world, join=True, start_method=method
    )
    results = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world)]
    for rank_results in results[1:]:
        for mine, theirs in zip(results[0], rank_results):
            mine["max_abs_diff"] = max(mine["max_abs_diff"], theirs["max_abs_diff"])
    return results[0]


def worker(rank: int, world: int, port: int, cases: list[dict[str, Any]], folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    init_gloo(rank, world, port)
    try:
        results = [run_case(dict(case)) for case in cases]
        Path(folder, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- cases
def case_unet(family: str, linfusion: bool, seed: int = 0) -> Any:
    """The tiny UNet of a case (LinFusion mounted with seeded random layers when ``linfusion``)."""
    from ..model import LinFusion
    from .tiny import tiny_unet

    unet = tiny_unet(family, seed=seed)
    if linfusion:
        torch.manual_seed(seed + 1)
        LinFusion.from_unet(unet, init="random").mount(unet)
    return unet


def case_unet_inputs(family: str, batch: int, height: int, width: int, seed: int = 0) -> dict[str, Any]:
    """Seeded keyword arguments of one UNet call for ``family`` (text context, SD-XL's added ids)."""
    generator = torch.Generator().manual_seed(seed)
    context = 64 if family == "sdxl" else 32
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, 4, height, width, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 7, context, generator=generator),
    }
    if family == "sdxl":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=generator),
            "time_ids": torch.randn(batch, 6, generator=generator) * 100,
        }
    return inputs


def case_transformer(family: str, linfusion: bool, seed: int = 0) -> Any:
    """The tiny PixArt transformer of a case (LinFusion mounted with seeded random layers when ``linfusion``)."""
    from ..model import LinFusion
    from .tiny import tiny_transformer

    transformer = tiny_transformer(family, seed=seed)
    if linfusion:
        torch.manual_seed(seed + 1)
        LinFusion.from_transformer(transformer, init="random").mount(transformer)
    return transformer


def case_transformer_inputs(
    family: str, batch: int, height: int, width: int, seed: int = 0
) -> dict[str, Any]:
    """Seeded keyword arguments of one PixArt transformer call (T5-like context with a padding mask)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 7)
    mask[:, 5:] = 0
    inputs: dict[str, Any] = {
        "hidden_states": torch.randn(batch, 4, height, width, generator=generator),
        "timestep": torch.tensor([500] * batch),
        "encoder_hidden_states": torch.randn(batch, 7, 32, generator=generator),
        "encoder_attention_mask": mask,
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    if family == "pixart-alpha":
        inputs["added_cond_kwargs"] = {
            "resolution": torch.tensor([[8.0 * height, 8.0 * width]] * batch),
            "aspect_ratio": torch.tensor([[height / width]] * batch),
        }
    return inputs


def _measure(fn: Any) -> tuple[Any, dict[str, int], float]:
    from ..parallel.comm import GLOBAL_STATS

    GLOBAL_STATS.reset()
    start = time.perf_counter()
    with torch.no_grad():
        result = fn()
    elapsed = time.perf_counter() - start
    return result, dict(GLOBAL_STATS.bytes), elapsed


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One comparison; ``case["kind"]`` is "unet", "unet_manual", "controlnet", "transformer", "vae" or
    "pipeline" (``case["family"]`` a tiny pipeline family, PixArt ones included)."""
    kind = case["kind"]
    if kind == "pipeline":
        reference, parallel, comm_bytes, elapsed = _pipeline_case(case)
    else:
        reference, parallel, comm_bytes, elapsed = _model_case(case)
    diff = (reference.double() - parallel.double()).abs().max().item()
    return {
        **case,
        "max_abs_diff": diff,
        "shape": list(parallel.shape),
        "bytes": comm_bytes,
        "seconds": elapsed,
        "reference_abs_max": reference.abs().max().item(),
    }


def _model_case(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, int], float]:
    from ..parallel.layout import stripe_bounds
    from ..parallel.patch import spatial_parallel
    from ..parallel.pipeline import ParallelPipeline

    kind = case["kind"]
    family = case.get("family", "sd15")
    height, width, batch = case["height"], case.get("width", 8), case.get("batch", 1)
    if kind == "vae":
        from .tiny import tiny_vae

        vae = tiny_vae()
        if case.get("vae_attention") == "linear":
            from ..patches.vae_attention import apply_vae_attention

            apply_vae_attention(vae, "linear")  # the case's own VAE: kept
        latent = torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            reference = vae.decode(latent).sample
        parallel_pipe = ParallelPipeline(SimpleNamespace(vae=vae, unet=None), case.get("cfg_groups"))
        try:
            result, comm_bytes, elapsed = _measure(lambda: vae.decode(latent).sample)
        finally:
            parallel_pipe.remove()
        return reference, result, comm_bytes, elapsed

    if kind == "transformer":
        unet = case_transformer(family, case.get("linfusion", True))
        inputs = case_transformer_inputs(family, batch, height, width)
    else:
        unet = case_unet(family, case.get("linfusion", True) and kind != "controlnet")
        inputs = case_unet_inputs(family, batch, height, width)
    controlnet = None
    if kind == "controlnet":
        from diffusers import ControlNetModel

        from ..model import LinFusion

        torch.manual_seed(3)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
        for parameter in controlnet.parameters():  # from_unet zero-inits the output convs: make them count
            parameter.data.add_(torch.randn_like(parameter) * 0.02)
        if case.get("linfusion", True):
            torch.manual_seed(1)
            linfusion = LinFusion.from_unet(unet, init="random")
            linfusion.mount(unet)
            linfusion.mount(controlnet)
        image = torch.rand(batch, 3, 8 * height, 8 * width, generator=torch.Generator().manual_seed(2))

    def run() -> torch.Tensor:
        extra: dict[str, Any] = {}
        if controlnet is not None:
            down, mid = controlnet(**inputs, controlnet_cond=image, return_dict=False)
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        if case.get("dilated"):  # DemoFusion's second pass: dilated convolutions on a blurred latent
            from ..patches.dilation import apply_dilated_branch

            with apply_dilated_branch(unet, case["dilated"]):
                return unet(**inputs, **extra).sample
        return unet(**inputs, **extra).sample

    with torch.no_grad():
        reference = run()
    if kind == "unet_manual":
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        bounds = stripe_bounds(height, world, 2)
        start, stop = bounds[rank]
        local_inputs = {**inputs, "sample": inputs["sample"][..., start:stop, :]}
        with spatial_parallel(unet):
            local, comm_bytes, elapsed = _measure(lambda: unet(**local_inputs).sample)
        parts = [torch.empty(batch, 4, max(b - a for a, b in bounds), width) for _ in range(world)]
        padded = torch.zeros(batch, 4, parts[0].shape[2], width)
        padded[:, :, : stop - start] = local
        dist.all_gather(parts, padded)
        result = torch.cat([part[:, :, : b - a] for part, (a, b) in zip(parts, bounds)], dim=2)
        return reference, result, comm_bytes, elapsed
    pipe = SimpleNamespace(unet=unet, controlnet=controlnet, vae=None)
    if kind == "transformer":
        pipe = SimpleNamespace(transformer=unet, vae=None)
    parallel = ParallelPipeline(pipe, case.get("cfg_groups"))
    try:
        result, comm_bytes, elapsed = _measure(run)
        if case.get("repeat"):  # second call: cached sizes, same result
            again = run()
            assert torch.equal(again, result), "a second parallel call differs from the first"
    finally:
        parallel.remove()
    with torch.no_grad():
        restored = run()
    assert torch.equal(restored, reference), "the model is not restored after the parallel run"
    return reference, result, comm_bytes, elapsed


def _pipeline_case(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, int], float]:
    from ..model import LinFusion
    from ..parallel.pipeline import parallel_pipeline
    from .tiny import tiny_pipeline

    pipe = tiny_pipeline(case.get("family", "sd15"), case.get("task", "text2img"))
    torch.manual_seed(1)
    LinFusion.construct_for(pipe, load_pretrained=False, init="random")
    kwargs = {
        "prompt": "a red square",
        "height": case["height"],
        "width": case.get("width", 32),
        "num_inference_steps": case.get("steps", 2),
        "guidance_scale": case.get("guidance", 5.0),
        "output_type": "np",
    }
    if case.get("family", "sd15").startswith("pixart"):
        kwargs["use_resolution_binning"] = False
    if case.get("task", "text2img") != "text2img":
        import numpy as np
        from PIL import Image

        pixels = np.random.default_rng(0).integers(0, 256, (kwargs.pop("height"), kwargs.pop("width"), 3))
        kwargs.update(image=Image.fromarray(pixels.astype(np.uint8)), strength=0.6, num_inference_steps=4)

    def run() -> torch.Tensor:
        return torch.from_numpy(pipe(generator=torch.Generator().manual_seed(0), **kwargs).images)

    reference = run()
    with parallel_pipeline(pipe, case.get("cfg_groups")):
        result, comm_bytes, elapsed = _measure(run)
    return reference, result, comm_bytes, elapsed
