"""``linfusion bench``: ``linfusion bench attention`` (the op) and ``linfusion bench highres`` (whole chains).

Only argparse lives here; torch and the benchmark code are imported when a benchmark actually runs, so
that ``linfusion --help`` stays instant.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..choices import CHAIN_MODES, VAE_ATTENTION_MODES
from .options import add_verbosity_options, parse_size

DEFAULT_TOKENS = "1024,4096,16384,65536,262144,1048576"


def add_attention_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``linfusion bench attention``."""
    parser.add_argument(
        "--tokens",
        default=DEFAULT_TOKENS,
        help="comma-separated sequence lengths (all of them for the first head dim)",
    )
    parser.add_argument(
        "--wide-max-tokens",
        type=int,
        default=65536,
        help="largest sequence length for the other head dims (64, 80, 160), to bound the run time",
    )
    parser.add_argument(
        "--head-dims",
        default="40,80,160,64",
        help="head dims; 40/80/160 use SD-1.5's 8 heads, 64 uses SD-XL's 10 heads (see --heads)",
    )
    parser.add_argument("--heads", type=int, default=None, help="override the number of heads for all dims")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtypes", default="float32", help="timed dtypes: float32, float16, bfloat16")
    parser.add_argument(
        "--backends",
        default="chunked,reference",
        help="linfusion backends to time (chunked, reference, triton, auto); triton is added on CUDA "
        "when importable. SDPA is always the baseline unless --no-sdpa.",
    )
    parser.add_argument("--modes", default="forward,forward+backward", help="forward and/or forward+backward")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument(
        "--sdpa-cap-seconds",
        type=float,
        default=100.0,
        help="skip SDPA where one call is predicted (quadratic extrapolation) to take longer than this",
    )
    parser.add_argument(
        "--sdpa-budget-seconds",
        type=float,
        default=400.0,
        help="total predicted SDPA time for the run; later SDPA cases are skipped once it is spent",
    )
    parser.add_argument("--no-sdpa", action="store_true", help="do not run the SDPA baseline")
    parser.add_argument(
        "--reference-max-tokens",
        type=int,
        default=65536,
        help="largest sequence length for the (memory-hungry) reference backend",
    )
    parser.add_argument(
        "--accuracy-dtypes",
        default="float16,bfloat16",
        help="half dtypes checked against the fp32 reference at --accuracy-tokens ('' to skip)",
    )
    parser.add_argument(
        "--accuracy-tokens", type=int, default=None, help="sequence length of that check (default: largest)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument(
        "--sdpa-memory-cap-seconds",
        type=float,
        default=10.0,
        help="measure SDPA memory only where its median time is below this",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--tag", default="", help="suffix for the output file names")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="before starting, wait up to this many seconds for the 1-minute load average to drop "
        "below --idle-load (polled every 30 s)",
    )
    parser.add_argument("--idle-load", type=float, default=0.6)
    add_verbosity_options(parser, quiet=False)


def add_highres_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``linfusion bench highres``."""
    parser.add_argument(
        "--model", default="bundled", help="bundled, random-sd15, random-sdxl, a folder or Hub id"
    )
    parser.add_argument(
        "--size", type=parse_size, default="4096x4096", help="WIDTHxHEIGHT of the final image"
    )
    parser.add_argument("--mode", default="sdedit", choices=CHAIN_MODES)
    parser.add_argument("--attention", default="linfusion,sdpa", help="comma-separated: linfusion, sdpa")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument(
        "--prompt",
        default="a small red circle on the left , on a gray background",
        help="what to draw (default: a caption the bundled model knows; blue is not one of its backgrounds)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 (auto: fp16 on CUDA)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in each child (0: torch's default)"
    )
    parser.add_argument(
        "--sdpa-cap-seconds", type=float, default=600.0, help="skip SDPA stages predicted longer"
    )
    parser.add_argument(
        "--tile-from", type=int, default=2048 * 2048, help="exact tiled VAE from this many pixels"
    )
    parser.add_argument(
        "--vae-attention", default="exact", choices=VAE_ATTENTION_MODES, help="VAE mid-block attention kernel"
    )
    parser.add_argument(
        "--max-memory",
        default=None,
        help="plan every stage's savers for this budget (e.g. 20GB); default: none",
    )
    parser.add_argument("--timeout", type=float, default=4 * 3600.0, help="per configuration (seconds)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="")
    add_verbosity_options(parser, quiet=False)


def add_vae_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``linfusion bench vae``."""
    parser.add_argument("--sizes", default="256,512,1024", help="image sizes (square), comma-separated")
    parser.add_argument(
        "--policies",
        default="plain,full,half,level-inputs",
        help="store policies; plain (the reference) first",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per process; the median time is reported"
    )
    parser.add_argument("--band-mib", type=int, default=16, help="band_bytes of the tiler, in MiB")
    parser.add_argument("--dtype", default="float32", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--out", default="benchmarks/results/vae-bounded-cpu-1thread", help="path stem")
    parser.add_argument("--cost-16k", action="store_true", help="print the 16K cost-model table and exit")


def _run_vae(args: argparse.Namespace) -> int:
    from ..bench.vae import run_from_args

    return run_from_args(args)


def _run_attention(args: argparse.Namespace) -> int:
    from ..bench.attention import run_from_args

    return run_from_args(args)


def _run_highres(args: argparse.Namespace) -> int:
    from ..bench.highres import run_from_args

    return run_from_args(args)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="micro-benchmarks (attention op vs SDPA)",
        description="Micro-benchmarks. `linfusion bench attention` times every linear-attention backend "
        "against torch's scaled_dot_product_attention.",
    )
    bench_sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    attention = bench_sub.add_parser(
        "attention",
        help="linear attention backends vs SDPA: time, memory, memory-traffic floor",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_attention_arguments(attention)
    attention.set_defaults(func=_run_attention)
    highres = bench_sub.add_parser(
        "highres",
        help="a whole high-resolution chain, LinFusion vs SDPA: time and peak memory per stage",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_highres_arguments(highres)
    highres.set_defaults(func=_run_highres)
    vae = bench_sub.add_parser(
        "vae",
        help="the exact tiled VAE vs the plain one per store policy: exactness, peak RSS, time, FLOPs",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_vae_arguments(vae)
    vae.set_defaults(func=_run_vae)
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])
