"""Spatial-parallel inference: communication volume per UNet step, and wall time with 1 and 2 processes.

1. Volume: the full-size SD-1.5 UNet (``linfusion.registry.UNET_CONFIGS``, random weights on the ``meta``
   device: nothing is computed) runs one step (batch 2 = guidance) at each resolution on ``--stripes``
   ranks simulated as threads (:class:`linfusion.parallel.comm.ThreadCommunicator`), through the very
   patches and hooks real runs use; every collective counts its bytes. Compared with what a softmax
   patch-parallel method must move: every ``attn1``'s full K and V all-gathered (from the attn1 input
   shapes, and also measured by running the same UNet without LinFusion).
2. Wall time: a small UNet with LinFusion on 1 process (plain) and 2 gloo processes (stripes), one thread
   each, median of ``--repeats`` forwards, with the max abs difference to the single-process output.

    python benchmarks/parallel.py                      # both, JSON + Markdown in benchmarks/results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from linfusion.bench.harness import write_results

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------- 1. communication volume
def _meta_unet(family: str, linfusion: bool, dtype: torch.dtype) -> Any:
    from linfusion.model import LinFusion
    from linfusion.registry import build_meta_unet

    unet = build_meta_unet(family).to(dtype)
    if linfusion:
        LinFusion.from_unet(unet).mount(unet)
    return unet


def _attn1_kv_bytes(unet: Any, sample: torch.Tensor, context: torch.Tensor) -> int:
    """Full K and V of every attn1, all-gathered (world x chunk = the whole tensor): 2 x B x N x C bytes."""
    total = 0

    def hook(module: Any, args: tuple, output: Any) -> None:
        nonlocal total
        hidden = args[0]
        total += 2 * hidden.numel() * hidden.element_size()

    handles = [
        module.register_forward_hook(hook) for name, module in unet.named_modules() if name.endswith("attn1")
    ]
    with torch.no_grad():
        unet(sample, 500, context)
    for handle in handles:
        handle.remove()
    return total


def volume(family: str, pixels: int, stripes: int, linfusion: bool, dtype: torch.dtype) -> dict[str, Any]:
    """One UNet step on ``stripes`` thread-ranks (meta tensors); bytes per kind, max over ranks."""
    from linfusion.parallel.comm import ThreadCommunicator
    from linfusion.parallel.pipeline import SplitModel, Topology

    latent = pixels // 8
    batch = 2
    comms = ThreadCommunicator.world_of(stripes)
    unets = [_meta_unet(family, linfusion, dtype) for _ in range(stripes)]
    context_dim = unets[0].config.cross_attention_dim
    sample = torch.empty(batch, 4, latent, latent, device="meta", dtype=dtype)
    context = torch.empty(batch, 77, context_dim, device="meta", dtype=dtype)
    splits = [
        SplitModel(unet, Topology(stripes, rank, 1, stripes, comm, comm), True, comm)
        for rank, (unet, comm) in enumerate(zip(unets, comms))
    ]
    errors: list[BaseException] = []
    shapes: list[tuple[int, ...]] = []

    def run(rank: int) -> None:
        try:
            with torch.no_grad():
                shapes.append(tuple(unets[rank](sample, 500, context).sample.shape))
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
            comms[rank]._rendezvous.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(stripes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for split in splits:
        split.remove()
    if errors:
        raise errors[0]
    assert all(shape == (batch, 4, latent, latent) for shape in shapes), shapes
    kinds = sorted({kind for comm in comms for kind in comm.stats.bytes})
    per_kind = {kind: max(comm.stats.bytes[kind] for comm in comms) for kind in kinds}
    return {
        "family": family,
        "pixels": pixels,
        "latent": latent,
        "batch": batch,
        "stripes": stripes,
        "attn1": "linfusion" if linfusion else "softmax",
        "dtype": str(dtype).removeprefix("torch."),
        "bytes_by_kind_max_over_ranks": per_kind,
        "bytes_total_max_rank": max(comm.stats.total_bytes for comm in comms),
        "softmax_kv_allgather_bytes": _attn1_kv_bytes(unets[0], sample, context),
    }


# ---------------------------------------------------------------------- 2. wall time
def _timing_worker(rank: int, world: int, port: int, config: dict, folder: str) -> None:
    import torch.distributed as dist

    from linfusion.parallel.pipeline import ParallelPipeline
    from linfusion.testing.parallel import case_unet, case_unet_inputs, init_gloo

    torch.set_num_threads(1)
    if world > 1:
        init_gloo(rank, world, port, timeout_s=600)
    unet = case_unet("sd15", True)
    inputs = case_unet_inputs("sd15", config["batch"], config["latent"], config["latent"])
    with torch.no_grad():
        reference = unet(**inputs).sample
    parallel = ParallelPipeline(type("Pipe", (), {"unet": unet})(), cfg_groups=1) if world > 1 else None
    times = []
    with torch.no_grad():
        for index in range(config["warmup"] + config["repeats"]):
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            out = unet(**inputs).sample
            if index >= config["warmup"]:
                times.append(time.perf_counter() - start)
    if parallel is not None:
        parallel.remove()
        dist.destroy_process_group()
    diff = (out - reference).abs().max().item() if world > 1 else 0.0
    Path(folder, f"rank{rank}.json").write_text(json.dumps({"times_s": times, "max_abs_diff": diff}))


def wall_time(world: int, config: dict) -> dict[str, Any]:
    import tempfile

    import torch.multiprocessing as mp

    from linfusion.testing.parallel import free_port

    folder = tempfile.mkdtemp()
    mp.start_processes(
        _timing_worker,
        args=(world, free_port(), config, folder),
        nprocs=world,
        join=True,
        start_method="fork",
    )
    ranks = [json.loads(Path(folder, f"rank{rank}.json").read_text()) for rank in range(world)]
    per_run = [max(run) for run in zip(*(rank["times_s"] for rank in ranks))]  # the slowest rank per run
    return {
        "processes": world,
        **config,
        "times_s": per_run,
        "median_s": statistics.median(per_run),
        "max_abs_diff_vs_single_process": max(rank["max_abs_diff"] for rank in ranks),
    }


# ---------------------------------------------------------------------- main
def _environment(command: list[str]) -> dict[str, Any]:
    import diffusers

    from linfusion.bench.harness import environment

    env = environment(torch.device("cpu"), 1, " ".join(command))
    env.update(threads_per_process=1, diffusers_version=diffusers.__version__)
    return env


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Spatial-parallel inference: measured figures",
        "",
        f"Command: `{report['environment']['command']}`; {report['environment']['cpu_model']}, "
        f"torch {report['environment']['torch_version']}, diffusers {report['environment']['diffusers_version']}.",
        "",
        "## Communication per UNet step and rank (SD-1.5 UNet, batch 2, fp16 activations, 2 stripes)",
        "",
        "| image | latent | halo | GroupNorm | linear state | output gather | sizes | total / rank | softmax K/V all-gather | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["volume"]:
        if row["attn1"] != "linfusion":
            continue
        kinds = row["bytes_by_kind_max_over_ranks"]
        softmax = row["softmax_kv_allgather_bytes"]
        lines.append(
            f"| {row['pixels']} px | {row['latent']} | {_mb(kinds.get('halo', 0))} | {_mb(kinds.get('groupnorm', 0))} "
            f"| {_mb(kinds.get('linear_state', 0))} | {_mb(kinds.get('gather', 0))} | {_mb(kinds.get('sizes', 0))} "
            f"| {_mb(row['bytes_total_max_rank'])} | {_mb(softmax)} | {softmax / row['bytes_total_max_rank']:.1f}x |"
        )
    checks = [row for row in report["volume"] if row["attn1"] == "softmax"]
    if checks:
        lines += ["", "Softmax attn1 run through the same patches (instrumented K/V all-gather):", ""]
        for row in checks:
            measured = row["bytes_by_kind_max_over_ranks"].get("kv_gather", 0)
            lines.append(
                f"- {row['pixels']} px: measured kv_gather {_mb(measured)} vs shapes {_mb(row['softmax_kv_allgather_bytes'])}"
            )
    lines += [
        "",
        "## Wall time (tiny SD-1.5-like UNet with LinFusion, one thread per process)",
        "",
        f"{report['environment']['cpu_count']} CPU cores; load average at start "
        f"{report['environment']['loadavg_start'][0]:.1f} (other jobs share the machine). Each time is the "
        "slowest rank's forward (split + compute + gather), median of the runs.",
        "",
        "| processes | latent | batch | median s / forward | runs | max abs diff vs 1 process |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["wall_time"]:
        lines.append(
            f"| {row['processes']} | {row['latent']} | {row['batch']} | {row['median_s']:.3f} | {len(row['times_s'])} "
            f"| {row['max_abs_diff_vs_single_process']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def _mb(value: float) -> str:
    return f"{value / 2**20:,.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="512,1024,2048,4096,8192,16384", help="image sides in pixels")
    parser.add_argument("--stripes", type=int, default=2)
    parser.add_argument("--softmax-check", default="512,1024", help="sizes also run with softmax attn1")
    parser.add_argument("--latents", default="64,128", help="wall time: latent sides of the tiny UNet")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = ["python", "benchmarks/parallel.py", *(sys.argv[1:] if argv is None else argv)]
    report: dict[str, Any] = {"environment": _environment(command)}
    report["volume"] = []
    for pixels in (int(size) for size in args.sizes.split(",")):
        report["volume"].append(volume("sd15", pixels, args.stripes, True, torch.float16))
        print(json.dumps(report["volume"][-1]), flush=True)
    for pixels in (int(size) for size in args.softmax_check.split(",") if size):
        report["volume"].append(volume("sd15", pixels, args.stripes, False, torch.float16))
        print(json.dumps(report["volume"][-1]), flush=True)
    report["wall_time"] = []
    for latent in (int(side) for side in args.latents.split(",")):
        config = {"latent": latent, "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup}
        for world in (1, 2):
            report["wall_time"].append(wall_time(world, config))
            print(json.dumps(report["wall_time"][-1]), flush=True)
    report["environment"]["loadavg_end"] = list(os.getloadavg())
    stem = f"parallel-{args.tag}-{datetime.date.today().isoformat()}"
    paths = write_results(args.out, stem, report, _markdown(report))
    print(f"wrote {paths['json']} and {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
