"""Softmax vs LinFusion: the time of one PixArt transformer forward on this CPU, at 256, 512 and 1024 px.

The transformer is PixArt-Sigma's full-size architecture (``linfusion.registry.TRANSFORMER_CONFIGS``: width
1152, 16 heads of 72, T5-XXL captions of 4096 channels, patch 2) at reduced depth (``--blocks``, default 2
of its 28: every block is the same, so the time per block scales to the full model), random weights,
float32, one CFG branch (batch 1), 300 caption tokens. Both variants run in the same process on the same
weights: the original softmax self-attention (diffusers' SDPA), then LinFusion's layers mounted
(``LinFusion.from_transformer``: C/16 MLPs, q/k/v biases). Each time is the median of ``--runs`` calls
after one warm-up call. Writes ``benchmarks/results/dit-attention-cpu.json`` (raw) and ``.md``.

    PYTHONPATH=src python benchmarks/dit_attention.py --sizes 256,512,1024 --runs 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from linfusion.bench.harness import environment, loadavg, write_results

CAPTION_TOKENS = 300  # PixArt-Sigma's max_sequence_length


def time_forward(transformer: Any, size: int, runs: int) -> list[float]:
    """Seconds of ``runs`` forwards at ``size`` x ``size`` px (after one warm-up call)."""
    import torch

    config = transformer.config
    latents = torch.randn(1, config.in_channels, size // 8, size // 8)
    captions = torch.randn(1, CAPTION_TOKENS, config.caption_channels)
    mask = torch.ones(1, CAPTION_TOKENS)
    timestep = torch.tensor([500])

    def call() -> None:
        transformer(latents, encoder_hidden_states=captions, encoder_attention_mask=mask, timestep=timestep,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)  # fmt: skip

    seconds = []
    with torch.no_grad():
        call()
        for _ in range(runs):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="256,512,1024", help="square sizes in pixels, comma-separated")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per size and variant")
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks (PixArt-Sigma has 28)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    import torch
    from diffusers import PixArtTransformer2DModel

    from linfusion.model import LinFusion
    from linfusion.registry import TRANSFORMER_CONFIGS

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = {**TRANSFORMER_CONFIGS["pixart-sigma"], "num_layers": args.blocks}
    transformer = PixArtTransformer2DModel(**config).eval()
    linfusion = LinFusion.from_transformer(transformer, init="teacher")
    command = "python benchmarks/dit_attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {
        "environment": environment(torch.device("cpu"), args.threads, command),
        "model": f"PixArt-Sigma architecture, {args.blocks} of 28 blocks, random weights, float32, batch 1",
        "caption_tokens": CAPTION_TOKENS,
        "runs": [],
    }
    for size in (int(text) for text in args.sizes.split(",")):
        softmax = time_forward(transformer, size, args.runs)
        linfusion.mount(transformer)
        try:
            linear = time_forward(transformer, size, args.runs)
        finally:
            linfusion.unmount()
        row = {
            "size": size,
            "tokens": (size // 16) ** 2,
            "softmax_seconds": softmax,
            "linfusion_seconds": linear,
            "softmax_median": statistics.median(softmax),
            "linfusion_median": statistics.median(linear),
        }
        row["speedup"] = row["softmax_median"] / row["linfusion_median"]
        result["runs"].append(row)
        print(f"{size}: softmax {row['softmax_median']:.3f} s, LinFusion {row['linfusion_median']:.3f} s, "
              f"x{row['speedup']:.2f}", file=sys.stderr)  # fmt: skip
    env = result["environment"]
    env["loadavg_end"] = loadavg()
    rows = [
        f"| {r['size']}x{r['size']} | {r['tokens']:,} | {r['softmax_median']:.3f} | {r['linfusion_median']:.3f} | "
        f"{r['speedup']:.2f} |"
        for r in result["runs"]
    ]
    report = "\n".join([
        "# PixArt transformer forward on the CPU: softmax vs LinFusion self-attention",
        "",
        f"`{command}`; {env['cpu_model']} ({env['cpu_count']} cores, shared), torch {env['torch_version']}, "
        f"{args.threads} thread(s); load average {env['loadavg_start']} at the start, {env['loadavg_end']} "
        "at the end.",
        "",
        f"Model: {result['model']} (PixArt-Sigma's width 1152, 16 heads of 72, patch 2; the bundled DiT was not "
        f"on main), {CAPTION_TOKENS} caption tokens. Same process, same weights; LinFusion's layers "
        f"(C/16 MLPs, q/k/v biases) mounted for the second variant. Median of {args.runs} calls after one "
        "warm-up call.",
        "",
        "| size | image tokens | softmax (s) | LinFusion (s) | softmax / LinFusion |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Only the self-attention differs; the cross-attention to the text, the 4x-wide MLP and the "
        "projections are the same in both, so the ratio grows with the token count as the softmax "
        "attention's quadratic share grows.",
    ])  # fmt: skip
    write_results(args.out, "dit-attention-cpu", result, report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
