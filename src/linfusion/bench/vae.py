"""Bounded-memory exact VAE: plain vs tiled decode and encode, per store policy, on an SD-shaped VAE.

Every measurement runs in a fresh child process (RSS high-water marks depend on the heap's history): it
builds the VAE with random weights (seeded, so every child has the same weights), reads the RSS after
loading, resets the high-water mark (``/proc/self/clear_refs``), runs once for the peak and then
``repeats - 1`` more times for the median wall time, and saves the output so that the parent compares it
with the plain VAE's. FLOPs are counted with ``FlopCounterMode`` on the ``meta`` device and set beside
the analytic cost model's figures (:func:`linfusion.tiled_vae.tiled_vae_cost`).

Store policies: ``plain`` (the diffusers VAE), ``full`` (every point stored: nothing recomputed),
``half`` (the cheapest plan within half of the full store's peak: a mix of stored and recomputed
points), ``level-inputs`` (only each resolution level's input and the mid-block's level are stored).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..io import format_size
from ..registry import SD_VAE_CONFIG as SD_VAE
from ..tiled_vae import ExactTiler, tiled_vae_cost
from .harness import BenchmarkInputError, environment, loadavg, read_status_kib, reset_peak, write_results

POLICIES = ("plain", "full", "half", "level-inputs")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIB = 2**20


def sd_vae(
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: dict[str, Any] | None = None,
) -> Any:
    """``AutoencoderKL`` of the SD VAE's shape (or of ``config``) with random weights (no download)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoencoderKL(**(config or SD_VAE)).to(dtype).eval()


def vae_input(size: int, encode: bool, seed: int = 1, batch: int = 1) -> torch.Tensor:
    """Images in [-1, 1] to encode, or latents (size / 8) to decode."""
    generator = torch.Generator().manual_seed(seed)
    if encode:
        return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    return torch.randn(batch, 4, size // 8, size // 8, generator=generator)


def input_bytes(size: int, encode: bool, dtype: torch.dtype, batch: int = 1) -> int:
    """Bytes of :func:`vae_input`: made before the RSS baseline, but counted in the cost model's store."""
    elements = batch * (3 * size * size if encode else 4 * (size // 8) ** 2)
    return elements * torch.empty((), dtype=dtype).element_size()


def tiler_options(
    policy: str,
    size: int,
    encode: bool,
    dtype: torch.dtype,
    band_bytes: int,
    config: dict[str, Any] | None = None,
    store_limit_bytes: int | None = None,
) -> dict[str, Any]:
    """The ``ExactTiler`` keywords of a store policy (``half``: half the full store's modelled peak;
    ``budget``: the cheapest plan within ``store_limit_bytes``)."""
    options: dict[str, Any] = {"band_bytes": band_bytes}
    if policy == "budget":
        options["store_limit_bytes"] = store_limit_bytes
    elif policy == "half":
        full = tiled_vae_cost(
            config or SD_VAE,
            size,
            size,
            dtype=dtype,
            band_bytes=band_bytes,
            encode=encode,
            device_store_bytes=None,
        )
        options["store_limit_bytes"] = full.store_peak // 2
    elif policy == "level-inputs":
        options["store_points"] = "level-inputs"
    elif policy != "full":
        raise ValueError(f"unknown store policy {policy!r}; choose from {POLICIES}")
    return options


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Child process: one policy at one size; peak RSS above the loaded VAE and input, wall times."""
    torch.set_num_threads(spec.get("threads", 1))
    dtype = DTYPES[spec["dtype"]]
    encode, config = spec["encode"], spec.get("config")
    vae = sd_vae(dtype=dtype, config=config)
    tensor = vae_input(spec["size"], encode).to(dtype)
    if spec["policy"] == "plain":
        run = (lambda: vae._encode(tensor)) if encode else (lambda: vae.decode(tensor).sample)
    else:
        options = tiler_options(
            spec["policy"],
            spec["size"],
            encode,
            dtype,
            spec["band_bytes"],
            config,
            spec.get("store_limit_bytes"),
        )
        tiler = ExactTiler(vae, **options)
        run = (lambda: tiler.encode_moments(tensor)) if encode else (lambda: tiler.decode(tensor))
    if spec.get("warmup"):  # one small run first: lazy library state is then part of the baseline
        small = vae_input(64, encode).to(dtype)
        with torch.no_grad():
            vae._encode(small) if encode else vae.decode(small)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak(torch.device("cpu"))  # the high-water mark restarts at the current RSS
    baseline = read_status_kib("VmRSS") * 1024
    times = []
    with torch.no_grad():
        for index in range(spec.get("repeats", 1)):
            start = time.perf_counter()
            output = run()
            times.append(time.perf_counter() - start)
            if index == 0:
                peak = read_status_kib("VmHWM") * 1024 - baseline
                if spec.get("output"):
                    torch.save(output.float(), spec["output"])
            del output
    return {"peak": peak, "times": times}


def run_child(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process."""
    command = [sys.executable, "-m", "linfusion.bench.vae", "--child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def counted_flops(policy: str, size: int, encode: bool, dtype: torch.dtype, band_bytes: int) -> int:
    """FLOPs of one run as ``FlopCounterMode`` counts them, on the ``meta`` device (nothing computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    vae = sd_vae(device="meta", dtype=dtype)
    tensor = vae_input(size, encode).to("meta", dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if policy == "plain":
            vae._encode(tensor) if encode else vae.decode(tensor)
        else:
            tiler = ExactTiler(vae, **tiler_options(policy, size, encode, dtype, band_bytes))
            tiler.encode_moments(tensor) if encode else tiler.decode(tensor)
    return counter.get_total_flops()


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    load_at_start = loadavg()
    dtype = DTYPES[args.dtype]
    band_bytes = args.band_mib * MIB
    records = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            for encode in (False, True):
                reference = None
                for policy in args.policies:
                    output = str(Path(folder) / f"{size}-{encode}-{policy}.pt")
                    spec = {"policy": policy, "size": size, "encode": encode, "dtype": args.dtype,
                            "band_bytes": band_bytes, "repeats": args.repeats, "output": output,
                            "warmup": True}  # fmt: skip
                    measured = run_child(spec)
                    result = torch.load(output)
                    if policy == "plain":
                        reference = result
                    record = {
                        "size": size,
                        "direction": "encode" if encode else "decode",
                        "policy": policy,
                        "peak_rss": measured["peak"],
                        "times": measured["times"],
                        "median_time": statistics.median(measured["times"]),
                        "flops": counted_flops(policy, size, encode, dtype, band_bytes),
                        "max_abs_diff": None
                        if reference is None
                        else (result - reference).abs().max().item(),
                    }
                    if policy != "plain":
                        options = tiler_options(policy, size, encode, dtype, band_bytes)
                        options.pop("band_bytes")
                        cost = tiled_vae_cost(SD_VAE, size, size, dtype=dtype, band_bytes=band_bytes,
                                              encode=encode, device_store_bytes=None, **options)  # fmt: skip
                        record["model_peak"] = cost.device_peak - input_bytes(size, encode, dtype)
                        record["model_flops"] = cost.flops
                        record["store_limit_bytes"] = options.get("store_limit_bytes")
                    records.append(record)
                    print(json.dumps(record), flush=True)
    env = environment(torch.device("cpu"), 1, command=args.command)
    env["loadavg_start"] = load_at_start
    env["loadavg_end"] = loadavg()
    return {"environment": env, "band_bytes": band_bytes, "dtype": args.dtype, "records": records}


def markdown_report(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        "# Bounded-memory exact VAE: plain vs tiled, per store policy",
        "",
        f"Machine: {env['cpu_model']}, {env['cpu_count']} cores, torch {env['torch_version']}, 1 thread; "
        f"{result['dtype']}, band budget {format_size(result['band_bytes'])}; SD-shaped VAE with random weights. "
        f"Command: `{env['command']}`. Each row is a fresh process (one small warm-up run first, then the "
        f"measured runs); the machine is shared: load average {env['loadavg_start']} at the start, "
        f"{env['loadavg_end']} at the end, so other work ran beside these runs and times are noisy.",
        "",
        "| size | direction | policy | max abs diff vs plain | peak RSS | model peak | peak / plain | "
        "median time (s) | time / plain | FLOPs (counted) | FLOPs / plain | model FLOPs / counted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain: dict[tuple, dict] = {}
    for record in result["records"]:
        key = (record["size"], record["direction"])
        if record["policy"] == "plain":
            plain[key] = record
        base = plain.get(key)
        diff = "-" if record["max_abs_diff"] is None else f"{record['max_abs_diff']:.1e}"
        model_peak = format_size(record["model_peak"]) if "model_peak" in record else "-"
        model_flops = f"{record['model_flops'] / record['flops']:.6f}" if "model_flops" in record else "-"
        lines.append(
            f"| {record['size']} | {record['direction']} | {record['policy']} | {diff} | "
            f"{format_size(record['peak_rss'])} | {model_peak} | {record['peak_rss'] / base['peak_rss']:.2f} | "
            f"{record['median_time']:.2f} | {record['median_time'] / base['median_time']:.2f} | "
            f"{record['flops']:.3e} | {record['flops'] / base['flops']:.2f} | {model_flops} |"
        )
    lines += [
        "",
        "Peak RSS: high-water mark above the RSS with the VAE and its input loaded. Model peak: "
        "`tiled_vae_cost(..., device_store_bytes=None).device_peak` (store and chunks in the same memory), "
        "less the input, which is made before the baseline. "
        "FLOPs: `torch.utils.flop_counter.FlopCounterMode` on the meta device.",
    ]
    return "\n".join(lines) + "\n"


SIZES_16K = ((16384, 8192), (8192, 16384), (16384, 16384))


def cost_table_16k(
    band_bytes: int = 768 * MIB, device_store_bytes: int = 3 * 2**30, host_bytes: int = 64 * 2**30
) -> str:
    """Markdown: the cost model for SD's VAE in fp16 at 16K (linear mid-block attention), with part of the
    store on the device, and with all of it on the host; beside it the plain VAE's peak of live tensors,
    traced on ``meta``."""
    from ..patches.vae_attention import apply_vae_attention
    from ..tracing import traced_peak

    plain_vae = sd_vae(device="meta", dtype=torch.float16)
    apply_vae_attention(plain_vae, "linear")  # a meta copy made here: never removed
    lines = [
        "| size | direction | plain VAE: peak | device peak | host peak | FLOPs | plain FLOPs | overhead | "
        "store all on host: host peak | overhead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for width, height in SIZES_16K:
        for encode in (False, True):
            tensor = torch.empty(1, 3, height, width, device="meta", dtype=torch.float16)
            if not encode:
                tensor = torch.empty(1, 4, height // 8, width // 8, device="meta", dtype=torch.float16)
            plain = traced_peak(lambda: plain_vae._encode(tensor) if encode else plain_vae.decode(tensor))  # noqa: B023
            common = {
                "dtype": torch.float16,
                "band_bytes": band_bytes,
                "encode": encode,
                "attention": "linear",
            }
            split = tiled_vae_cost(SD_VAE, width, height, store_limit_bytes=host_bytes + device_store_bytes,
                                   device_store_bytes=device_store_bytes, **common)  # fmt: skip
            host = tiled_vae_cost(SD_VAE, width, height, store_limit_bytes=host_bytes, **common)
            lines.append(
                f"| {width}x{height} | {'encode' if encode else 'decode'} | {format_size(plain)} | "
                f"{format_size(split.device_peak)} | "
                f"{format_size(split.host_peak)} | {split.flops:.3e} | {split.plain_flops:.3e} | "
                f"{split.overhead:.2f}x | {format_size(host.host_peak)} | {host.overhead:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def checked_sizes(text: str) -> list[int]:
    """``--sizes``: comma-separated image sides, positive multiples of 8 (:class:`BenchmarkInputError` if not)."""
    try:
        sizes = [int(size) for size in text.split(",") if size.strip()]
    except ValueError as error:
        raise BenchmarkInputError(
            f"--sizes {text!r}: expected comma-separated sides such as 256,512"
        ) from error
    if not sizes or any(size < 8 or size % 8 for size in sizes):
        raise BenchmarkInputError(
            f"--sizes {text!r}: each side must be a positive multiple of 8, such as 256"
        )
    return sizes


def checked_policies(text: str) -> list[str]:
    """``--policies``: known store policies, ``plain`` (the reference) first."""
    policies = [policy.strip() for policy in text.split(",") if policy.strip()]
    unknown = [policy for policy in policies if policy not in POLICIES]
    if unknown:
        raise BenchmarkInputError(f"unknown store policy {unknown}; choose from {', '.join(POLICIES)}")
    if not policies or policies[0] != "plain":
        raise BenchmarkInputError("the policies must start with plain (the reference)")
    return policies


def run_from_args(args: argparse.Namespace) -> int:
    """``linfusion bench vae``: the measurements, or with ``--cost-16k`` the cost model's 16K table."""
    if args.cost_16k:
        print(cost_table_16k(), end="")
        return 0
    args.sizes, args.policies = checked_sizes(args.sizes), checked_policies(args.policies)
    for option, value in (("--repeats", args.repeats), ("--band-mib", args.band_mib)):
        if value < 1:
            raise BenchmarkInputError(f"{option} must be >= 1; got {value}")
    args.command = "linfusion bench vae " + " ".join(sys.argv[3:])
    result = run_benchmark(args)
    report = markdown_report(result)
    write_results(Path(args.out).parent, Path(args.out).name, result, report)
    print(report)
    return 0


if __name__ == "__main__":  # one measurement in a fresh process (peaks depend on the heap's history)
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(measure(json.loads(sys.argv[2]))))
