"""How close the linear VAE mid-block attention is to the VAE's own softmax attention (bundled VAE).

For each size, held-out shape scenes are rendered at that size, encoded and decoded with the exact layer,
the linear layer, and the layer dropped (residual only, the scale of what the layer contributes).
Writes ``benchmarks/results/vae-attention-bundled.{json,md}``.

    python benchmarks/vae_attention.py --sizes 32,64,128,256,512 --images 4

A script rather than a ``linfusion bench`` command: it measures the bundled model, not any user's model
(users run :func:`linfusion.patches.vae_attention.measure_vae_attention` on their own VAE).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from linfusion.bench.harness import environment, write_results
from linfusion.bundled import load_pipeline, shapes
from linfusion.patches.vae_attention import measure_vae_attention


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,64,128,256,512")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae = load_pipeline().vae
    records = []
    for size in (int(s) for s in args.sizes.split(",")):
        seeds = [shapes.split_seed(index, "heldout") for index in range(args.images)]
        images = shapes.to_tensor(np.stack([shapes.render_seed(seed, size=size)[0] for seed in seeds]))
        start = time.perf_counter()
        record = measure_vae_attention(vae, images)[0]
        record["seconds"] = time.perf_counter() - start
        records.append(record)
        print(json.dumps(record), file=sys.stderr, flush=True)
    command = "python benchmarks/vae_attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "environment": environment(torch.device("cpu"), args.threads, command.strip()),
        "images_per_size": args.images,
        "records": records,
    }
    lines = [
        "# Linear VAE mid-block attention vs the bundled VAE's softmax attention",
        "",
        f"`{result['environment']['command']}` ({args.images} held-out scenes per size, rendered at that size; "
        "PSNR in dB over images in [-1, 1])",
        "",
        "| size | mid-block tokens | VAE reconstruction (exact vs input) | linear vs exact | layer dropped vs exact |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['size']} | {r['tokens']:,} | {r['reconstruction_psnr']:.1f} | {r['linear_vs_exact_psnr']:.1f} "
            f"| {r['dropped_vs_exact_psnr']:.1f} |"
        )
    write_results(args.out, "vae-attention-bundled", result, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
