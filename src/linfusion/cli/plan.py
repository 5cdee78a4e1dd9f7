"""``linfusion plan``: argument parsing only; the work is in :mod:`linfusion.app.plan`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..choices import GENERATION_MODES, VAE_ATTENTION_CHOICES
from .options import parse_budget, parse_size

FITS, DOES_NOT_FIT = 0, 3


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="plan a run without running it: memory per stage, savers, FLOPs, predicted time",
        description="Plan a generation for any machine: each stage's device and host peak, the savers that "
        "make it fit, its FLOPs and a predicted time on a named GPU (on --device cpu: on this machine's CPU). Needs neither a GPU nor weights (the "
        "model is built on the meta device from its configs). Exit 0 when it fits, 3 when it does not.",
    )
    parser.add_argument(
        "--model",
        default="bundled",
        help="bundled, random-sd15, random-sdxl, random-pixart-sigma, random-pixart-alpha (full-size "
        "architectures, no weights needed), a pipeline folder or a Hub id in the local cache",
    )
    parser.add_argument("--size", type=parse_size, required=True, help="WIDTHxHEIGHT of the final image")
    parser.add_argument("--mode", default="sdedit", choices=GENERATION_MODES)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="the device planned for")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float16", "bfloat16", "float32"),
        help="auto: float16 on cuda, float32 on cpu (as linfusion generate runs)",
    )
    parser.add_argument(
        "--max-memory",
        type=parse_budget,
        default=None,
        help="device budget such as 12GB (default: this GPU's free memory)",
    )
    parser.add_argument(
        "--host-memory",
        type=parse_budget,
        default=None,
        help="host memory for what is parked off a GPU, such as 64GB (default: this machine's available memory)",
    )
    parser.add_argument("--steps", type=int, default=25, help="denoising steps of the base stage")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale (> 1: two UNet branches)")
    parser.add_argument("--nproc", type=int, default=1, help="plan one rank of an N-process torchrun run")
    parser.add_argument(
        "--gpu", default="h100", choices=("h100", "a100", "4090"), help="GPU of the predicted time (cuda)"
    )
    parser.add_argument(
        "--link",
        default=None,
        choices=("pcie4", "pcie5"),
        help="host<->device link of the predicted transfer time (default: the GPU's own: pcie5 for h100)",
    )
    parser.add_argument(
        "--vae-attention",
        default="auto",
        choices=VAE_ATTENTION_CHOICES,
        help="VAE mid-block attention kernel planned (auto: what linfusion generate would pick)",
    )
    parser.add_argument("--no-linfusion", action="store_true", help="plan the model's original attention")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..app.plan import PlanRequest, make_plan

    width, height = args.size
    request = PlanRequest(
        model=args.model, width=width, height=height, mode=args.mode, device=args.device, dtype=args.dtype,
        max_memory=args.max_memory, host_memory=args.host_memory, steps=args.steps, guidance=args.guidance,
        nproc=args.nproc, gpu=args.gpu, linfusion=not args.no_linfusion, vae_attention=args.vae_attention,
        link=args.link,
    )  # fmt: skip
    planned = make_plan(request)  # a request that cannot be planned raises a UserError: exit 2 (cli.main)
    print(json.dumps(planned.to_json(), indent=1) if args.json else planned.describe())
    return FITS if planned.plan.fits else DOES_NOT_FIT
