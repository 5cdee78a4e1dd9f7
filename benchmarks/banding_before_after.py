"""Two source trees of linfusion, the same 16K engines, one machine, one run: CPU seconds before and after.

Measures, with the bundled model and 1 torch thread, (a) one banded-UNet call (LinFusion mounted, batch 2
as with classifier-free guidance) and (b) one exact tiled decode with the linear VAE attention. Every
measurement runs in a fresh subprocess with ``PYTHONPATH=<that tree's src>``, alternating trees
(A B A B ...), so both see the same machine state; the medians, the after/before ratio and the largest
difference between the trees' outputs go to ``<out>/<stem>.json`` and ``.md``.

    python benchmarks/banding_before_after.py --before /path/to/old/src --after src --repeats 3

Only public entry points are used (``linfusion.app.loading``, ``linfusion.patches.banded_unet``,
``linfusion.patches.vae_attention``, ``linfusion.tiled_vae``), so the trees may differ in everything else.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20
SEED = 1234
MEASUREMENTS = ("unet", "vae")


# ------------------------------------------------------------------------------------ in the subprocess
def run_unet(args: argparse.Namespace) -> tuple[float, Any]:
    """One banded-UNet call of the bundled model with LinFusion, on seeded latents and text context."""
    import torch
    from diffusers import StableDiffusionPipeline

    from linfusion.app.loading import BUNDLED_MODEL, attach_linfusion
    from linfusion.patches.banded_unet import apply_banded_unet

    pipe = StableDiffusionPipeline.from_pretrained(str(BUNDLED_MODEL), local_files_only=True)
    attach_linfusion(pipe, str(BUNDLED_MODEL), "auto")
    unet = pipe.unet.eval()
    apply_banded_unet(unet, band_bytes=args.unet_band_mib * MIB)
    generator = torch.Generator().manual_seed(SEED)
    side = args.latent
    sample = torch.randn(args.batch, unet.config.in_channels, side, side, generator=generator)
    context = torch.randn(args.batch, 77, unet.config.cross_attention_dim, generator=generator)
    timestep = torch.tensor(500)
    with torch.no_grad():
        start = time.perf_counter()
        out = unet(sample, timestep, encoder_hidden_states=context).sample
        return time.perf_counter() - start, out


def run_vae(args: argparse.Namespace) -> tuple[float, Any]:
    """One exact tiled decode of seeded latents by the bundled VAE with the linear mid-block attention."""
    import torch
    from diffusers import AutoencoderKL

    from linfusion.app.loading import BUNDLED_MODEL
    from linfusion.patches.vae_attention import apply_vae_attention
    from linfusion.tiled_vae import tiled_decode

    vae = AutoencoderKL.from_pretrained(str(BUNDLED_MODEL / "vae"), local_files_only=True).eval()
    apply_vae_attention(vae, "linear")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = args.vae_size // factor
    latents = torch.randn(
        1, vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(SEED)
    )
    with torch.no_grad():
        start = time.perf_counter()
        out = tiled_decode(vae, latents, band_bytes=args.vae_band_mib * MIB)
        return time.perf_counter() - start, out


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    seconds, out = (run_unet if args.child == "unet" else run_vae)(args)
    torch.save(out.detach().cpu(), args.save)
    import linfusion

    print(json.dumps({"seconds": seconds, "linfusion": str(Path(linfusion.__file__).parent)}))


# ------------------------------------------------------------------------------------ in the parent
def size_flags(args: argparse.Namespace) -> list[str]:
    return [
        f"--latent={args.latent}",
        f"--batch={args.batch}",
        f"--unet-band-mib={args.unet_band_mib}",
        f"--vae-size={args.vae_size}",
        f"--vae-band-mib={args.vae_band_mib}",
    ]


def measure_once(args: argparse.Namespace, which: str, src: Path, save: Path) -> float:
    """Run one measurement in a fresh interpreter with ``src`` first on the path; its seconds."""
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    env.update({name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    command = [sys.executable, str(Path(__file__).resolve()), f"--child={which}", f"--save={save}"]
    proc = subprocess.run(command + size_flags(args), env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{which} with {src} failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(report["linfusion"]).resolve() != (src / "linfusion").resolve():
        raise SystemExit(f"the subprocess imported linfusion from {report['linfusion']}, not from {src}")
    return float(report["seconds"])


def tree_revision(src: Path) -> str:
    """The git commit of the tree holding ``src`` (with '+changes' when its work tree differs), if any."""

    def git(*words: str) -> str:
        proc = subprocess.run(["git", "-C", str(src), *words], capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    return (head + ("+changes" if git("status", "--porcelain", "--", ".") else "")) or "not a git tree"


def compare(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    runs: dict[str, dict[str, list[float]]] = {m: {"before": [], "after": []} for m in args.measure}
    differences: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for which in args.measure:
            for repeat in range(args.repeats):
                for tree, src in trees.items():  # alternating: A B A B ...
                    save = Path(scratch) / f"{which}-{tree}-{repeat}.pt"
                    seconds = measure_once(args, which, src, save)
                    runs[which][tree].append(seconds)
                    print(f"{which} {tree} #{repeat + 1}: {seconds:.3f} s", file=sys.stderr, flush=True)
            outputs = {
                t: [torch.load(Path(scratch) / f"{which}-{t}-{r}.pt") for r in range(args.repeats)]
                for t in trees
            }
            differences[which] = max((a - outputs["before"][0]).abs().max().item() for a in outputs["after"])
    results = {}
    for which in args.measure:
        before, after = (statistics.median(runs[which][t]) for t in ("before", "after"))
        results[which] = {
            "seconds_before": runs[which]["before"],
            "seconds_after": runs[which]["after"],
            "median_before": before,
            "median_after": after,
            "ratio_after_over_before": after / before,
            "max_abs_difference": differences[which],
        }
    return {
        "trees": {t: {"src": str(p), "revision": tree_revision(p)} for t, p in trees.items()},
        "results": results,
    }


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    env = result["environment"]
    titles = {
        "unet": f"banded UNet, latent {args.latent}x{args.latent}, batch {args.batch}, band {args.unet_band_mib} MiB",
        "vae": f"tiled decode to {args.vae_size}x{args.vae_size}, linear VAE attention, band {args.vae_band_mib} MiB",
    }
    lines = [
        "# Banded engines on CPU: before / after",
        "",
        f"`{env['command']}`",
        "",
        f"{env['cpu_model']} ({env['cpu_count']} CPUs), torch {env['torch_version']}, {env['torch_threads']} "
        f"torch thread, each run in a fresh process, trees alternating, {args.repeats} run(s) per tree; "
        f"load average at the start {env['loadavg_start']}.",
        "",
        f"- before: `{result['trees']['before']['src']}` ({result['trees']['before']['revision']})",
        f"- after: `{result['trees']['after']['src']}` ({result['trees']['after']['revision']})",
        "",
        "| measurement | before s (median) | after s (median) | after / before | max abs diff | runs before | runs after |",
        "|---|---|---|---|---|---|---|",
    ]
    for which, row in result["results"].items():
        runs = [", ".join(f"{s:.2f}" for s in row[f"seconds_{t}"]) for t in ("before", "after")]
        lines.append(
            f"| {titles[which]} | {row['median_before']:.3f} | {row['median_after']:.3f} | "
            f"{row['ratio_after_over_before']:.3f} | {row['max_abs_difference']:.3g} | {runs[0]} | {runs[1]} |"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="the src/ folder of the tree measured first in each pair")
    parser.add_argument("--after", help="the src/ folder of the tree measured second in each pair")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", default="unet,vae", help="comma-separated: unet, vae")
    parser.add_argument("--latent", type=int, default=128, help="UNet latent side (tokens: its square)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2: classifier-free guidance)")
    parser.add_argument("--unet-band-mib", type=int, default=32)
    parser.add_argument("--vae-size", type=int, default=1024, help="decoded image side in pixels")
    parser.add_argument("--vae-band-mib", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--stem", default="banding-kernels-cpu")
    parser.add_argument("--child", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.measure = [m for m in args.measure.split(",") if m]
    if args.child is None and (not args.before or not args.after or set(args.measure) - set(MEASUREMENTS)):
        parser.error("--before and --after are required; --measure takes unet and/or vae")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        child(args)
        return 0
    import torch

    from linfusion.bench.harness import environment, write_results

    command = "python benchmarks/banding_before_after.py " + " ".join(sys.argv[1:] if argv is None else argv)
    env = environment(torch.device("cpu"), 1, command)
    result = {"environment": env, **compare(args)}
    paths = write_results(args.out, args.stem, result, markdown(result, args))
    print(f"wrote {paths['json']} and {paths['md']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
