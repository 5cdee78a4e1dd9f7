"""Draws a UI-format workflow as a picture (boxes, widget values, links): the graph in docs/comfyui.md.

``python tools/render_workflow.py workflows/sdedit-sd15-4k.json OUT.png`` (needs matplotlib).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

COLOURS = {"MODEL": "#b39ddb", "CLIP": "#ffd54f", "VAE": "#ef9a9a", "CONDITIONING": "#ffab91",
           "LATENT": "#f48fb1", "IMAGE": "#80cbc4"}  # fmt: skip
WIDTH, HEIGHT = 350, 230


def label(node: dict) -> str:
    values = node["widgets_values"]
    if node["type"] == "KSampler":
        lines = [f"steps {values[2]}, cfg {values[3]}", f"denoise {values[6]}", f"{values[4]}, {values[5]}"]
    elif node["type"] in ("LinFusionVAEDecode", "LinFusionVAEEncode"):
        lines = [f"store limit {values[0]} MiB", f"band {values[1]} MiB", f"{values[2]} attention",
                 f"store on {values[3]}"]  # fmt: skip
    elif node["type"] == "ImageScale":
        lines = [f"{values[0]} to {values[1]}x{values[2]}"]
    elif node["type"] == "EmptyLatentImage":
        lines = [f"{values[0]}x{values[1]}"]
    else:
        lines = [str(v)[:26] for v in values]
    return node["type"] + "\n" + "\n".join(lines)


def render(workflow: dict, out: str) -> None:
    nodes = {node["id"]: node for node in workflow["nodes"]}
    right = max(n["pos"][0] for n in nodes.values()) + WIDTH
    bottom = max(n["pos"][1] for n in nodes.values()) + HEIGHT
    figure, axes = plt.subplots(figsize=(right / 160, bottom / 160), dpi=100)
    for _, source, slot, target, target_slot, kind in workflow["links"]:
        x0, y0 = nodes[source]["pos"][0] + WIDTH, nodes[source]["pos"][1] + 40 + 30 * slot
        x1, y1 = nodes[target]["pos"][0], nodes[target]["pos"][1] + 40 + 30 * target_slot
        axes.plot(
            [x0, (x0 + x1) / 2, (x0 + x1) / 2, x1], [y0, y0, y1, y1], color=COLOURS[kind], lw=2, zorder=1
        )
    for node in nodes.values():
        x, y = node["pos"]
        linfusion = node["type"].startswith("LinFusion")
        axes.add_patch(FancyBboxPatch((x, y), WIDTH, HEIGHT - 40, boxstyle="round,pad=4", zorder=2,
                                      facecolor="#e3f2fd" if linfusion else "#f5f5f5", edgecolor="#455a64"))  # fmt: skip
        axes.text(
            x + 10, y + 12, label(node), va="top", ha="left", fontsize=8.5, family="monospace", zorder=3
        )
    axes.set_xlim(-20, right + 20)
    axes.set_ylim(bottom + 20, -20)
    axes.axis("off")
    figure.savefig(out, bbox_inches="tight")


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        render(json.load(handle), sys.argv[2])
