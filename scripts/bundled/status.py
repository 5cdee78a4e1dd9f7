"""Print the progress of the bundled-model training: steps, s/step, loss and the conditioning gap.

python scripts/bundled/status.py [artifacts/bundled]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(root: str = "artifacts/bundled") -> int:
    base = Path(root)
    for stage in ("classifier", "vae", "unet", "dit"):
        log = base / stage / "log.jsonl"
        if not log.exists():
            print(f"{stage}: not started")
            continue
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        steps = [r for r in records if "loss" in r]
        configs = [r for r in records if r.get("event") in ("config", "resume")]
        total = configs[-1].get("steps", "?") if configs else "?"
        if not steps:
            print(f"{stage}: started, no step logged yet")
            continue
        last = steps[-1]
        print(
            f"{stage}: step {last['step']}/{total}  loss {last['loss']:.4f}  s/step {last['s_per_step']:.3f}"
        )
        for record in records:
            if "heldout_psnr" in record:
                print(f"  step {record['step']:>6}  held-out PSNR {record['heldout_psnr']:.2f} dB")
            if "eval_gap" in record:
                per_t = " ".join(
                    f"t{k[len('eval_cond_t') :]}:{record[k]:.3f}/{record['eval_uncond_t' + k[len('eval_cond_t') :]]:.3f}"
                    for k in sorted(record)
                    if k.startswith("eval_cond_t")
                )
                print(
                    f"  step {record['step']:>6}  loss {record['loss']:.4f}  cond {record['eval_cond']:.4f}"
                    f"  uncond {record['eval_uncond']:.4f}  gap {record['eval_gap']:.4f}  ({per_t})"
                )
        gates = base / stage / "gates.jsonl"
        if gates.exists():
            for line in gates.read_text().splitlines():
                r = json.loads(line)
                print(
                    f"  gates @ step {r.get('step')}: background {r['caption_background']:.2f}"
                    f"  colour {r.get('caption_found_colour', float('nan')):.2f}"
                    f"  shape {r.get('caption_found_shape', float('nan')):.2f}"
                    f"  (at the slot: colour {r['caption_colour']:.2f} shape {r['caption_shape']:.2f})"
                    f"  position {r['caption_position']:.2f}  passes {r['passes']}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
