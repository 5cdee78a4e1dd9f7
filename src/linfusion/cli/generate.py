"""``linfusion generate`` and ``linfusion upscale``: argument parsing only; the work is in :mod:`linfusion.app`."""

from __future__ import annotations

import argparse
from typing import Any

from ..choices import CHAIN_MODES, DTYPE_NAMES, GENERATION_MODES, SCHEDULERS, VAE_ATTENTION_CHOICES
from ..parallel.launch import parallel_command
from .options import add_verbosity_options, parse_budget, parse_size


def _add_shared(parser: argparse.ArgumentParser, out_default: str) -> None:
    """The options ``generate`` and ``upscale`` share."""
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument(
        "--guidance",
        type=float,
        default=7.5,
        help="classifier-free guidance scale, >= 0 (1 or less: no guidance, as in diffusers)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="-1: a random seed (the PNG records the one used)"
    )
    parser.add_argument("--out", default=out_default, help="PNG to write (folder created if needed)")
    parser.add_argument(
        "--model",
        default=None,
        help="pipeline folder or Hub id (Stable Diffusion 1.x/2.x/XL or PixArt-Alpha/Sigma), bundled (the "
        "default) or bundled-dit (the bundled PixArt)",
    )
    parser.add_argument(
        "--linfusion",
        default="auto",
        help="LinFusion weights: Hub id or folder (auto: the model folder's own linfusion/, else the "
        "published weights that fit; none are published for PixArt: distill them)",
    )
    parser.add_argument("--no-linfusion", action="store_true", help="use the model's original attention")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_NAMES))
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--scheduler", default=None, help=", ".join(SCHEDULERS))
    parser.add_argument("--save-stages", default=None, help="folder for every stage's image")
    parser.add_argument(
        "--max-memory",
        type=parse_budget,
        default=None,
        help="memory budget such as 24GB (default: the device's free memory)",
    )
    parser.add_argument(
        "--host-memory",
        type=parse_budget,
        default=None,
        help="host memory for what is parked off a GPU (exact tiled VAE and banded UNet stores, offloaded "
        "weights), such as 64GB (default: the machine's available memory)",
    )
    parser.add_argument(
        "--vae-attention",
        default="auto",
        choices=VAE_ATTENTION_CHOICES,
        help="the VAE mid-block attention: exact softmax (quadratic time), linear (linear time, a close "
        "approximation; see docs/high-resolution.md), or auto: exact where it is cheap, linear where its "
        "fidelity on this VAE is measured (the bundled model's), else exact with a warning. The PNG records "
        "the kernel used",
    )
    add_verbosity_options(parser)


def register(subparsers: Any) -> None:
    generate = subparsers.add_parser(
        "generate",
        help="generate an image from a prompt with LinFusion (default model: the bundled one)",
        description="Generate one image. The PNG records every setting in its 'parameters' text chunk; "
        "--from-png makes the same image again.",
    )
    generate.add_argument("prompt", nargs="?", help="what to draw")
    generate.add_argument("--size", type=parse_size, default=None, help="WIDTHxHEIGHT, multiples of 8")
    generate.add_argument(
        "--mode",
        default="plain",
        choices=GENERATION_MODES,
        help="sdedit: generate at the native size, then enlarge in stages (for 2K-16K); demofusion: the "
        "same stages steered by a dilated global branch (the SD-XL recipe, fewer repeated objects)",
    )
    generate.add_argument("--from-png", default=None, help="repeat the generation recorded in this PNG")
    _add_shared(generate, out_default="outputs/linfusion.png")
    generate.set_defaults(func=run)

    upscale = subparsers.add_parser(
        "upscale",
        help="enlarge an existing image with SDEdit stages (super-resolution)",
        description="Enlarge IMAGE by --scale: resize x2 and re-denoise at decreasing strength per stage.",
    )
    upscale.add_argument("image", help="the image to enlarge")
    upscale.add_argument(
        "--scale", type=float, required=True, help="how much larger, > 1: e.g. 4 for 4x width and height"
    )
    upscale.add_argument("--prompt", default="", help="what the image shows (guides the new detail)")
    upscale.add_argument("--mode", default="sdedit", choices=CHAIN_MODES, help="stage recipe")
    _add_shared(upscale, out_default="outputs/upscaled.png")
    upscale.set_defaults(func=run_upscale)


def _params(args: argparse.Namespace, prompt: str, size: tuple[int, int] | None, mode: str) -> Any:
    from ..app.params import GenerationError, GenerationParams

    if args.no_linfusion and args.linfusion != "auto":
        raise GenerationError(
            f"--no-linfusion and --linfusion {args.linfusion} contradict each other; pass one of them"
        )
    width, height = size or (None, None)
    return GenerationParams(
        prompt=prompt,
        negative_prompt=args.negative_prompt,
        width=width,
        height=height,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        scheduler=args.scheduler,
        model=args.model,
        linfusion="none" if args.no_linfusion else args.linfusion,
        dtype=args.dtype,
        mode=mode,
        vae_attention=args.vae_attention,
    )


@parallel_command  # torchrun --nproc_per_node=N: spatial-parallel (linfusion.parallel)
def run(args: argparse.Namespace) -> int:
    import sys

    from ..app.params import GenerationParams, ignored_settings, png_parameters_text
    from ..app.run import generate

    if args.from_png:
        text = png_parameters_text(args.from_png)
        params = GenerationParams.from_text(text)
        for note in ignored_settings(text):
            print(note, file=sys.stderr)
    else:
        params = _params(args, args.prompt or "", args.size, args.mode)
    out = generate(
        params, args.out, device=args.device, progress=not args.quiet, save_stages=args.save_stages,
        max_memory=args.max_memory, host_memory=args.host_memory,
    )  # fmt: skip
    _report(out, args.quiet)
    return 0


@parallel_command
def run_upscale(args: argparse.Namespace) -> int:
    from ..app.run import upscale_file

    params = _params(args, args.prompt, None, args.mode)
    out = upscale_file(
        args.image, args.scale, params, args.out, device=args.device, progress=not args.quiet,
        save_stages=args.save_stages, max_memory=args.max_memory, host_memory=args.host_memory,
    )  # fmt: skip
    _report(out, args.quiet)
    return 0


def _report(out: Any, quiet: bool) -> None:
    """The output path on stdout: alone with ``--quiet`` (for scripts), else as a sentence."""
    print(out if quiet else f"wrote {out}")
