"""``linfusion distill``: argument parsing for :func:`linfusion.distill.distill`."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from .options import add_verbosity_options


def _loss_weights(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(
            "expected three comma-separated numbers noise,kd,feat (e.g. 1,0.5,0.5)"
        )
    try:
        return tuple(float(p) for p in parts)  # type: ignore[return-value]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _mid_dim(text: str) -> int | str | None:
    if text == "auto":
        return "auto"
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError("expected auto, none, -1 or a positive integer") from error


def register(subparsers: Any) -> None:
    from ..distill.config import DistillConfig  # torch-free: the defaults shown in --help

    defaults = DistillConfig.__dataclass_fields__
    parser = subparsers.add_parser(
        "distill",
        help="linearize a Stable Diffusion or PixArt checkpoint: train LinFusion layers from images + captions",
        description="Distill LinFusion layers from a teacher SD-1.x/2.x/XL or PixArt-Alpha/Sigma pipeline. Run under "
        "`accelerate launch` for several GPUs or processes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--teacher",
        required=True,
        help="diffusers pipeline: Hub id, local folder, bundled (the bundled UNet model) or bundled-dit (the bundled PixArt)",
    )
    parser.add_argument(
        "--data", required=True, help="image folder (.txt captions or metadata.jsonl) or a datasets dataset"
    )
    parser.add_argument(
        "--output",
        required=True,
        help="output folder: checkpoints, logs and the final LinFusion weights; must be new, empty, or "
        "a run of linfusion distill to --resume",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --output that is not a linfusion distill run, or start a finished or "
        "interrupted run again from step 0 (its checkpoints and log are replaced)",
    )
    parser.add_argument("--resolution", type=int, default=defaults["resolution"].default)
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"].default, help="per process")
    parser.add_argument("--grad-accum", type=int, default=defaults["grad_accum"].default)
    parser.add_argument("--lr", type=float, default=defaults["lr"].default)
    parser.add_argument("--lr-scheduler", default=defaults["lr_scheduler"].default)
    parser.add_argument("--lr-warmup-steps", type=int, default=defaults["lr_warmup_steps"].default)
    parser.add_argument(
        "--max-steps", type=int, default=defaults["max_steps"].default, help="optimizer steps"
    )
    parser.add_argument("--seed", type=int, default=defaults["seed"].default)
    parser.add_argument("--checkpoint-every", type=int, default=defaults["checkpoint_every"].default)
    parser.add_argument(
        "--checkpoints-total-limit", type=int, default=defaults["checkpoints_total_limit"].default
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="latest, or a checkpoint folder; its settings must match (see --allow-config-change)",
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: continue with training settings (lr, batch size, data, ...) other than the "
        "checkpoint's; model settings (--teacher, --projection-mid-dim) can never change",
    )
    parser.add_argument("--init", choices=("teacher", "random"), default=defaults["init"].default)
    parser.add_argument(
        "--projection-mid-dim", type=_mid_dim, default="auto", help="auto, none (= C), -1 or int"
    )
    parser.add_argument("--caption-dropout", type=float, default=defaults["caption_dropout"].default)
    parser.add_argument("--loss-weights", type=_loss_weights, default="1,0.5,0.5", help="noise,kd,feat")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--cache-latents", action="store_true", help="encode every image once (crops fixed)")
    parser.add_argument("--center-crop", action="store_true", help="centre crops instead of random ones")
    parser.add_argument("--allow-missing-captions", action="store_true")
    parser.add_argument("--image-column", default=defaults["image_column"].default)
    parser.add_argument("--caption-column", default=defaults["caption_column"].default)
    parser.add_argument("--validate-every", type=int, default=0)
    parser.add_argument("--validation-prompts", nargs="+", default=[])
    parser.add_argument("--validation-steps", type=int, default=defaults["validation_steps"].default)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--report-to", default=None, help="an accelerate tracker, e.g. tensorboard")
    add_verbosity_options(parser, quiet=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..distill import DistillConfig, distill

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    not_settings = ("func", "command", "center_crop", "verbose")
    values = {key: value for key, value in vars(args).items() if key not in not_settings}
    values["random_crop"] = not args.center_crop
    output = distill(DistillConfig(**values))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"LinFusion weights written to {output} (load with LinFusion.from_pretrained({str(output)!r}))")
    return 0
