"""The example workflows in ``workflows/``: the SDEdit chain to 4K, 8K and 16K with SD-1.5 and SD-XL.

Each chain is what linfusion's ``--mode sdedit`` runs: a text-to-image base at the model's native size,
then per stage a stock upscale (Lanczos) and a KSampler at that stage's denoise, each decode and encode
through the exact tiled VAE nodes. Written in both of ComfyUI's formats: the API format (``POST /prompt``)
and the UI format (drag the file onto ComfyUI's page). The tests regenerate them and compare.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import linfusion_calls as lf

FOLDER = Path(__file__).resolve().parent / "workflows"
PROMPT = "a lighthouse on a rocky coast at sunset, highly detailed"
NEGATIVE = "blurry, low quality"
SIZES = {"4k": 4096, "8k": 8192, "16k": 16384}
MODELS = {  # checkpoint file name, native long side, SD-XL?, classifier-free guidance
    "sd15": ("v1-5-pruned-emaonly.safetensors", 512, False, 7.0),
    "sdxl": ("sd_xl_base_1.0.safetensors", 1024, True, 6.0),
}
STEPS = 25
VAE_OPTIONS = {"store_limit_mb": 0, "band_mb": 256, "vae_attention": "exact", "store_on": "cpu",
               "device_store_mb": 0}  # fmt: skip
# Host memory the VAE store may hold per target size (the untiled store of a 16K decode would be 192 GiB;
# these fit the smallest workable stores, 0.8 / 3.1 / 12.1 GiB, with room to recompute less).
STORE_LIMIT_MB = {"4k": 4096, "8k": 8192, "16k": 16384}

# UI format: each class's widget order, link inputs and outputs (name, type).
WIDGETS = {
    "CheckpointLoaderSimple": ["ckpt_name"],
    "LinFusionApply": ["weights", "download"],
    "CLIPTextEncode": ["text"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "KSampler": ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "LinFusionVAEDecode": list(VAE_OPTIONS),
    "LinFusionVAEEncode": list(VAE_OPTIONS),
    "ImageScale": ["upscale_method", "width", "height", "crop"],
    "SaveImage": ["filename_prefix"],
}
LINK_INPUTS = {
    "LinFusionApply": [("model", "MODEL")],
    "CLIPTextEncode": [("clip", "CLIP")],
    "KSampler": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                 ("latent_image", "LATENT")],
    "LinFusionVAEDecode": [("samples", "LATENT"), ("vae", "VAE")],
    "LinFusionVAEEncode": [("pixels", "IMAGE"), ("vae", "VAE")],
    "ImageScale": [("image", "IMAGE")],
    "SaveImage": [("images", "IMAGE")],
}  # fmt: skip
OUTPUTS = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "LinFusionApply": [("MODEL", "MODEL")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "LinFusionVAEDecode": [("IMAGE", "IMAGE")],
    "LinFusionVAEEncode": [("LATENT", "LATENT")],
    "ImageScale": [("IMAGE", "IMAGE")],
    "SaveImage": [],
}


@dataclass
class Graph:
    """Nodes in API form: id -> {"class_type", "inputs"}, a link input being [node id, output index]."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    columns: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add(self, class_type: str, column: int, row: int, **inputs: Any) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        self.columns[node_id] = (column, row)
        return node_id


def chain_graph(model: str, size: str) -> Graph:
    """The SDEdit chain of ``model`` ("sd15" / "sdxl") to a square ``size`` ("4k", "8k", "16k")."""
    checkpoint, native, sdxl, cfg = MODELS[model]
    side = SIZES[size]
    vae_options = {**VAE_OPTIONS, "store_limit_mb": STORE_LIMIT_MB[size]}
    graph = Graph()
    loader = graph.add("CheckpointLoaderSimple", 0, 0, ckpt_name=checkpoint)
    unet = graph.add("LinFusionApply", 1, 0, model=[loader, 0], weights="auto", download=True)
    positive = graph.add("CLIPTextEncode", 1, 1, clip=[loader, 1], text=PROMPT)
    negative = graph.add("CLIPTextEncode", 1, 2, clip=[loader, 1], text=NEGATIVE)
    latent = image = None
    for index, (width, height, denoise, steps) in enumerate(lf.chain_stages(side, side, native, sdxl, STEPS)):
        column, row = 2, index  # one row per stage: upscale, encode, sample, decode
        if denoise is None:
            latent = graph.add("EmptyLatentImage", column + 1, row, width=width, height=height, batch_size=1)
            denoise = 1.0
        else:
            scaled = graph.add("ImageScale", column, row, image=[image, 0], upscale_method="lanczos",
                               width=width, height=height, crop="disabled")  # fmt: skip
            latent = graph.add("LinFusionVAEEncode", column + 1, row, pixels=[scaled, 0], vae=[loader, 2],
                               **vae_options)  # fmt: skip
        sampled = graph.add("KSampler", column + 2, row, model=[unet, 0], positive=[positive, 0],
                            negative=[negative, 0], latent_image=[latent, 0], seed=1, steps=steps, cfg=cfg,
                            sampler_name="euler", scheduler="normal", denoise=round(denoise, 6))  # fmt: skip
        image = graph.add("LinFusionVAEDecode", column + 3, row, samples=[sampled, 0], vae=[loader, 2],
                          **vae_options)  # fmt: skip
    graph.add("SaveImage", 6, index, images=[image, 0], filename_prefix=f"linfusion-{model}-{size}")
    return graph


def api_format(graph: Graph) -> dict[str, Any]:
    return {node_id: dict(node) for node_id, node in graph.nodes.items()}


def ui_format(graph: Graph) -> dict[str, Any]:
    """The graph as ComfyUI's page saves workflows (nodes with positions and widget values, links)."""
    links: list[list[Any]] = []
    outputs: dict[tuple[str, int], list[int]] = {}
    nodes = []
    for order, (node_id, node) in enumerate(graph.nodes.items()):
        class_type, inputs = node["class_type"], node["inputs"]
        ui_inputs = []
        for name, kind in LINK_INPUTS.get(class_type, []):
            source, slot = inputs[name]
            links.append([len(links) + 1, int(source), slot, int(node_id), len(ui_inputs), kind])
            outputs.setdefault((source, slot), []).append(len(links))
            ui_inputs.append({"name": name, "type": kind, "link": len(links)})
        widgets = [
            ("fixed" if name == "control_after_generate" else inputs[name]) for name in WIDGETS[class_type]
        ]
        column, row = graph.columns[node_id]
        nodes.append({"id": int(node_id), "type": class_type, "pos": [40 + 380 * column, 60 + 240 * row],
                      "size": [320, 130], "flags": {}, "order": order, "mode": 0, "inputs": ui_inputs,
                      "outputs": [], "properties": {"Node name for S&R": class_type}, "widgets_values": widgets})  # fmt: skip
    for node in nodes:
        for slot, (name, kind) in enumerate(OUTPUTS[node["type"]]):
            node["outputs"].append({"name": name, "type": kind, "links": outputs.get((str(node["id"]), slot), []),
                                    "slot_index": slot})  # fmt: skip
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}  # fmt: skip


def workflows() -> dict[str, dict[str, Any]]:
    """File name -> workflow, for every model, size and format."""
    files = {}
    for model in MODELS:
        for size in SIZES:
            graph = chain_graph(model, size)
            files[f"sdedit-{model}-{size}.api.json"] = api_format(graph)
            files[f"sdedit-{model}-{size}.json"] = ui_format(graph)
    return files


def render(workflow: dict[str, Any]) -> str:
    return json.dumps(workflow, indent=1) + "\n"


def write(folder: Path = FOLDER) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, workflow in workflows().items():
        (folder / name).write_text(render(workflow))
        written.append(folder / name)
    return written
