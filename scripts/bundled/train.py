"""Train the bundled models: ``vae``, ``unet``, ``classifier``, ``dit`` and export stages, all resumable.

Usage (one CPU core, from the repository root; ``scripts`` on the module path):
    PYTHONPATH=scripts python -m bundled.train vae --resume
    PYTHONPATH=scripts python -m bundled.train unet --resume
    PYTHONPATH=scripts python -m bundled.train classifier
    PYTHONPATH=scripts python -m bundled.train export
    PYTHONPATH=scripts python -m bundled.train dit --resume      # the tiny DiT (PixArt) on the same VAE
    PYTHONPATH=scripts python -m bundled.train export-dit
Every stage writes under artifacts/bundled/<stage>/ (checkpoint.pt, log.jsonl); see docs/bundled-model.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import torch


def _add_config_args(parser: argparse.ArgumentParser, config_class: type) -> None:
    for field in dataclasses.fields(config_class):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if isinstance(default, list):
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, nargs="+", default=default)
        else:
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default), default=default)


def _config(config_class: type, args: argparse.Namespace) -> object:
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


def main(argv: list[str] | None = None) -> int:
    from . import classifier_training, components, dit_training, training

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, config_class in (
        ("vae", training.VaeConfig),
        ("unet", training.UnetConfig),
        ("classifier", classifier_training.ClassifierConfig),
        ("dit", dit_training.DitConfig),
    ):
        stage = sub.add_parser(name)
        _add_config_args(stage, config_class)
        stage.add_argument("--resume", action="store_true", help="continue from out-dir/checkpoint.pt")
    export = sub.add_parser("export")
    export.add_argument("--unet-checkpoint", default=str(training.ARTIFACTS / "unet" / "checkpoint.pt"))
    export.add_argument("--vae-dir", default=str(training.ARTIFACTS / "vae" / "final"))
    export.add_argument("--out", default=str(components.MODEL_DIR))
    export.add_argument("--no-ema", action="store_true")
    export.add_argument(
        "--copy-logs",
        default=None,
        help="also copy the stages' log.jsonl (and gates.jsonl) into this folder, to commit them",
    )
    export_dit = sub.add_parser("export-dit", help="save the DiT checkpoint as a PixArtSigmaPipeline folder")
    export_dit.add_argument("--dit-checkpoint", default=str(training.ARTIFACTS / "dit" / "checkpoint.pt"))
    export_dit.add_argument("--out", default=str(dit_training.dc.DIT_MODEL_DIR))
    export_dit.add_argument("--no-ema", action="store_true")
    export_dit.add_argument(
        "--copy-logs", default=None, help="also copy the DiT's log.jsonl (and gates.jsonl) here"
    )
    data = sub.add_parser("distill-data", help="write training-split scenes as a captioned image folder")
    data.add_argument("--out", default=str(training.ARTIFACTS / "distill-data"))
    data.add_argument("--count", type=int, default=8000)
    data.add_argument("--size", type=int, default=32)
    linfusion = sub.add_parser(
        "export-linfusion", help="save distilled LinFusion weights as fp16 into the model folder"
    )
    linfusion.add_argument("--distilled", default=str(training.ARTIFACTS / "distill"))
    linfusion.add_argument("--out", default=str(components.MODEL_DIR / "linfusion"))
    for name, what, checkpoint_flag, default_dir in (
        ("gates", "UNet", "--unet-checkpoint", "unet"),
        ("dit-gates", "DiT", "--dit-checkpoint", "dit"),
    ):
        gates = sub.add_parser(
            name, help=f"export the {what} checkpoint to a temp folder and run the quality gates"
        )
        gates.add_argument(
            checkpoint_flag,
            dest="checkpoint",
            default=str(training.ARTIFACTS / default_dir / "checkpoint.pt"),
        )
        if name == "gates":
            gates.add_argument("--vae-dir", default=str(training.ARTIFACTS / "vae" / "final"))
        gates.add_argument("--model", default=None, help="score this pipeline folder instead of a checkpoint")
        gates.add_argument("--n", type=int, default=96)
        gates.add_argument("--steps", type=int, default=20)
        gates.add_argument("--guidance-scale", type=float, default=4.0)
        gates.add_argument("--no-ema", action="store_true")
        gates.add_argument("--log", default=str(training.ARTIFACTS / default_dir / "gates.jsonl"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.stage == "vae":
        print(training.train_vae(_config(training.VaeConfig, args), resume=args.resume))
    elif args.stage == "unet":
        print(training.train_unet(_config(training.UnetConfig, args), resume=args.resume))
    elif args.stage == "dit":
        print(dit_training.train_dit(_config(dit_training.DitConfig, args), resume=args.resume))
    elif args.stage == "export-dit":
        print(dit_training.export_dit(args.dit_checkpoint, args.out, use_ema=not args.no_ema))
        if args.copy_logs:
            _copy_logs(args.copy_logs, stages=("dit",))
    elif args.stage == "classifier":
        config = _config(classifier_training.ClassifierConfig, args)
        classifier_training.train_classifier(config, resume=args.resume)
        print(config.out_dir)
    elif args.stage == "export":
        print(training.export_pipeline(args.unet_checkpoint, args.vae_dir, args.out, use_ema=not args.no_ema))
        if args.copy_logs:
            _copy_logs(args.copy_logs)
    elif args.stage == "distill-data":
        print(_distill_data(args.out, args.count, args.size))
    elif args.stage == "export-linfusion":
        print(_export_linfusion(args.distilled, args.out))
    else:
        print(json.dumps(_gates(args), sort_keys=True))
    return 0


def _distill_data(folder: str, count: int, size: int) -> str:
    """Training-split scenes (seeds 0 .. count - 1) as NAME.png + NAME.txt; skips files already there."""
    from pathlib import Path

    from PIL import Image

    from linfusion.bundled import shapes
    from linfusion.io import atomic_file

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image_path = root / f"{index:06d}.png"
        if image_path.exists():
            continue
        pixels, scene = shapes.render_seed(shapes.split_seed(index, "train"), size)
        (root / f"{index:06d}.txt").write_text(scene.caption())
        with atomic_file(image_path) as handle:
            Image.fromarray(pixels).save(handle, format="PNG")
    return str(root)


def _export_linfusion(distilled: str, out: str) -> str:
    """The distilled weights (fp32 training output) saved as fp16 safetensors, written atomically."""
    from pathlib import Path

    from linfusion import LinFusion
    from linfusion.io import atomic_folder

    target = Path(out)
    with atomic_folder(target) as staging:
        LinFusion.from_pretrained(distilled).to(torch.float16).save_pretrained(staging)
    return str(target)


def _copy_logs(folder: str, stages: tuple[str, ...] = ("classifier", "vae", "unet")) -> None:
    import shutil
    from pathlib import Path

    from . import training

    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        for name in ("log.jsonl", "gates.jsonl"):
            source = training.ARTIFACTS / stage / name
            if source.exists():
                shutil.copyfile(source, target / f"{stage}_{name}")
                print(target / f"{stage}_{name}")


def _gates(args: argparse.Namespace) -> dict:
    from . import checkpoint, components, dit_components, dit_training, evaluate, training

    dit = args.stage == "dit-gates"
    record: dict = {"guidance_scale": args.guidance_scale, "steps": args.steps, "ema": not args.no_ema}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            state = checkpoint.load(args.checkpoint)
            record["step"] = state["step"] if state else None
            if dit:
                folder = dit_training.export_dit(args.checkpoint, tmp, use_ema=not args.no_ema)
            else:
                folder = training.export_pipeline(args.checkpoint, args.vae_dir, tmp, use_ema=not args.no_ema)
        pipe = dit_components.load_pipeline(folder) if dit else components.load_pipeline(folder)
        record.update(
            {
                f"caption_{k}": v
                for k, v in evaluate.caption_scores(
                    pipe, n=args.n, steps=args.steps, guidance_scale=args.guidance_scale
                ).items()
            }
        )
        record.update({f"denoise_{k}": v for k, v in evaluate.conditioning_gap(pipe).items()})
    record["passes"] = evaluate.passes_gates({k: record[f"caption_{k}"] for k in evaluate.GATES})
    if args.model is None and args.log:
        checkpoint.JsonlLog(args.log, resume_step=1 << 60).write(record)
    return record


if __name__ == "__main__":
    sys.exit(main())
