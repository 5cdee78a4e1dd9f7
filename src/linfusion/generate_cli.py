"""``linfusion generate``: argument parsing only; the work is in :mod:`linfusion.generate`."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x768; got {text!r}") from error
    return width, height


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate an image from a prompt with LinFusion (default model: the bundled one)",
        description="Generate one image. The PNG records every setting in its 'parameters' text chunk; "
        "--from-png makes the same image again.",
    )
    parser.add_argument("prompt", nargs="?", help="what to draw")
    parser.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 8 (default: native)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/linfusion.png", help="PNG to write (folder created if needed)")
    parser.add_argument("--model", default=None, help="diffusers pipeline folder or Hub id (default: bundled)")
    parser.add_argument("--linfusion", default="auto", help="LinFusion weights: Hub id or folder (default: auto)")
    parser.add_argument("--no-linfusion", action="store_true", help="use the model's original attention")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--scheduler", default=None, help="ddim, euler, euler-a, dpm++, unipc, pndm, lms")
    parser.add_argument("--from-png", default=None, help="repeat the generation recorded in this PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .generate import GenerationError, GenerationParams, generate, read_png_parameters

    try:
        if args.from_png:
            params = read_png_parameters(args.from_png)
        else:
            width, height = args.size or (None, None)
            params = GenerationParams(
                prompt=args.prompt or "",
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
            )
        out = generate(params, args.out, device=args.device, progress=not args.quiet)
    except GenerationError as error:
        print(f"linfusion generate: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
