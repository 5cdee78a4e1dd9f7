"""Quality report of the bundled model: teacher vs distilled LinFusion student vs random-modules student.

Writes benchmarks/results/quality-<tag>.json (raw numbers, environment, command), docs/quality.md (the
report) and docs/quality-examples.png (the first 8 captions per variant and scale). See
:mod:`bundled.quality` (``scripts/bundled/quality.py``) for what is measured. From the repository root:

    export PYTHONPATH=scripts
    python -m bundled.quality_report                    # 200 held-out captions, 1x / 2x / 4x
    python -m bundled.quality_report --n 16 --scales 1  # quick look
    # two cores: generate in two processes, then report (cached images are reused)
    python -m bundled.quality_report --generate-only --variants teacher & \
    python -m bundled.quality_report --generate-only --variants student,random; wait; python -m bundled.quality_report
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from linfusion.io import atomic_file, atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
NOTES_MARKER = "<!-- notes: kept when the script rewrites this file -->"


def _grid(results: dict, path: Path) -> None:
    """Rows: variant x scale; columns: the first captions. Every image shown at the 4x size."""
    rows = []
    target = max(entry["size"] for entry in results.values())
    for entry in results.values():
        for name in ("teacher", "student", "random"):
            tiles = entry["examples"][name]
            row = [
                np.asarray(Image.fromarray(t).resize((target, target), Image.Resampling.NEAREST))
                for t in tiles
            ]
            rows.append(np.concatenate(row, axis=1))
    grid = np.concatenate(rows, axis=0)
    with atomic_file(path) as handle:
        Image.fromarray(grid).save(handle, format="PNG")


def _markdown(result: dict) -> str:
    env, config, results = result["environment"], result["config"], result["results"]
    lines = [
        "# Quality of the bundled LinFusion student",
        "",
        "Made by `PYTHONPATH=scripts python -m bundled.quality_report` (raw numbers: "
        f"`{result['json']}`). {config['n']} held-out captions (1 to 3 objects, seeds from "
        f"{config['start']}), DDIM steps per size as listed, guidance {config['guidance']}, fixed seeds: image i of "
        "every variant starts from the same noise. Variants: the **teacher** (softmax self-attention), the "
        "**student** (the committed LinFusion weights, distilled by `linfusion distill`), and a control student "
        "with **random** (untrained) LinFusion modules.",
        "",
        "Adherence = mean of the classifier's background, colour, shape and position accuracies (strict: each "
        "object read at its own slot; `linfusion.bundled.classifier`, 100 % on rendered held-out scenes). "
        "PSNR / SSIM: each image against the teacher's image of the same caption and seed (LPIPS needs "
        "downloaded network weights: not run).",
        "",
        f"Machine: {env['cpu_model']}, {env['torch_threads']} thread(s), torch {env['torch_version']}; "
        f"command: `{env['command']}`.",
        "",
        "| size (steps) | variant | adherence | background | colour | shape | position | count | PSNR vs teacher "
        "| SSIM vs teacher | s / image |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in results.values():
        for name in ("teacher", "student", "random"):
            r = entry[name]
            fidelity = (
                f"{r['psnr_vs_teacher']:.1f} dB | {r['ssim_vs_teacher']:.3f}"
                if name != "teacher"
                else "- | -"
            )
            lines.append(
                f"| {entry['size']} px ({entry['steps']}) | {name} | {r['adherence']:.3f} | {r['background']:.3f} | {r['colour']:.3f} "
                f"| {r['shape']:.3f} | {r['position']:.3f} | {r['count']:.3f} | {fidelity} "
                f"| {r['seconds_per_image']:.3f} |"
            )
    lines += ["", "## Targets", ""]
    for key, check in result["targets"].items():
        numbers = ", ".join(f"{k} {v:.3f}" for k, v in check.items() if isinstance(v, float))
        lines.append(f"- {key}: {'met' if check['met'] else 'NOT met'} ({numbers})")
    lines += [
        "",
        "![teacher, student, random per size](quality-examples.png)",
        "",
        "Rows: teacher, student, random at each size (top to bottom: "
        + ", ".join(f"{e['size']} px" for e in results.values())
        + "); columns: the first 8 captions:",
        "",
    ]
    lines += [f"{i + 1}. {caption}" for i, caption in enumerate(result["captions"][:8])]
    return "\n".join(lines) + "\n"


def _cache_path(cache: Path, tag: str, scale: int, name: str, steps: int, n: int) -> Path:
    return cache / f"{tag}-{scale}x-{name}-{steps}steps-{n}.npz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="pipeline folder (default: the bundled model)")
    parser.add_argument("--linfusion", default=None, help="LinFusion weights (default: MODEL/linfusion)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--start", type=int, default=20_000, help="first held-out scene index")
    parser.add_argument("--scales", default="1,2,4")
    parser.add_argument("--variants", default="teacher,student,random", help="which to generate in this run")
    parser.add_argument("--steps", default="20,20,10", help="DDIM steps at 1x,2x,4x (one value: all scales)")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="bundled")
    parser.add_argument(
        "--cache",
        default=str(ROOT / "artifacts" / "quality"),
        help="generated images per (scale, variant) are kept here: an interrupted run resumes, and several "
        "runs with different --variants can share the cores; the report needs all of them",
    )
    parser.add_argument(
        "--chain", action="store_true", help="above the native size, generate through the SDEdit chain"
    )
    parser.add_argument("--generate-only", action="store_true", help="generate (into --cache), no report")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="where quality.md goes ('' to skip)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from diffusers import DiffusionPipeline

    from linfusion import LinFusion
    from linfusion.bench.harness import environment
    from linfusion.bundled import MODEL_DIR
    from linfusion.bundled import classifier as classifier_lib

    from . import quality

    model = Path(args.model) if args.model else MODEL_DIR
    weights = Path(args.linfusion) if args.linfusion else model / "linfusion"
    scenes = quality.quality_scenes(args.n, args.start)
    prompts = [scene.caption() for scene in scenes]
    scales = [int(s) for s in args.scales.split(",")]
    step_values = [int(s) for s in args.steps.split(",")]
    steps_at = dict(zip([1, 2, 4], step_values)) if len(step_values) > 1 else {}
    steps_for = {scale: steps_at.get(scale, step_values[0]) for scale in scales}
    cache = Path(args.cache)
    cache_tag = f"{args.tag}-chain" if args.chain else args.tag
    cache.mkdir(parents=True, exist_ok=True)
    pipe = distilled = None
    for scale in scales:
        for name in args.variants.split(","):
            path = _cache_path(cache, cache_tag, scale, name, steps_for[scale], args.n)
            if path.exists():
                continue
            if pipe is None:  # the bundled UNet (StableDiffusionPipeline) or DiT (PixArtSigmaPipeline) folder
                pipe = DiffusionPipeline.from_pretrained(
                    str(model), dtype=torch.float32, local_files_only=True
                )
                pipe.set_progress_bar_config(disable=True)
            if distilled is None and name == "student":
                distilled = LinFusion.from_pretrained(weights).to(torch.float32)
            images, seconds = quality.generate_variant(
                pipe, distilled, name, prompts, scale, steps_for[scale], args.guidance, chain=args.chain
            )
            with atomic_file(path) as handle:
                np.savez_compressed(handle, images=images, seconds_per_image=seconds, threads=args.threads)
            print(f"[quality] {scale}x {name}: {seconds:.3f} s/image", file=sys.stderr, flush=True)
    if args.generate_only:
        return 0

    classifier = classifier_lib.load_classifier()
    results: dict = {}
    for scale in scales:
        loaded = {
            name: np.load(_cache_path(cache, cache_tag, scale, name, steps_for[scale], args.n))
            for name in quality.VARIANTS
        }
        teacher = loaded["teacher"]["images"]
        entry: dict = {"size": int(teacher.shape[1]), "steps": steps_for[scale]}
        for name, data in loaded.items():
            record = quality.score_variant(
                data["images"], scenes, None if name == "teacher" else teacher, classifier
            )
            record["seconds_per_image"] = float(data["seconds_per_image"])
            record["threads"] = int(data["threads"])
            entry[name] = record
        entry["examples"] = {name: data["images"][:8] for name, data in loaded.items()}
        results[f"{scale}x"] = entry
    command = "PYTHONPATH=scripts python -m bundled.quality_report " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    result: dict = {
        "environment": environment(torch.device("cpu"), args.threads, command.strip()),
        "config": {
            "n": args.n,
            "start": args.start,
            "steps": steps_for,
            "guidance": args.guidance,
            "chain": args.chain,
            "model": str(model),
            "linfusion": str(weights),
        },  # fmt: skip
        "captions": prompts,
        "targets": quality.targets(results),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"quality-{args.tag}.json"
    result["json"] = str(json_path.relative_to(ROOT)) if json_path.is_relative_to(ROOT) else str(json_path)
    serializable = {
        key: {k: v for k, v in entry.items() if k != "examples"} for key, entry in results.items()
    }
    atomic_write_text(json_path, json.dumps({**result, "results": serializable}, indent=1))
    result["results"] = results
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        _grid(results, docs / "quality-examples.png")
        target = docs / "quality.md"
        notes = ""  # hand-written reading of the numbers, kept across re-runs below this marker
        if target.exists() and NOTES_MARKER in target.read_text():
            notes = "\n" + NOTES_MARKER + target.read_text().split(NOTES_MARKER, 1)[1]
        atomic_write_text(target, _markdown(result) + notes)
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
