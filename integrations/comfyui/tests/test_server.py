"""The node pack in ComfyUI's real server, on loopback: every example workflow, rewritten to the tiny
model and small sizes, posted to ``/prompt``; ``/history`` polled with a bounded timeout; PNGs written."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import PACK, TESTS

pytestmark = pytest.mark.server
START_TIMEOUT_S = 90
RUN_TIMEOUT_S = 120
BASE_SIDE = 32  # every chain is scaled so that its base generation is 32 x 32 pixels


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(url: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(base_dir, tiny_weights):
    """ComfyUI's server on 127.0.0.1 with this node pack and the tiny test loader in custom_nodes/."""
    custom = base_dir / "custom_nodes"
    custom.mkdir(exist_ok=True)
    for name, target in (("linfusion-nodes", PACK), ("linfusion_test_tiny", TESTS / "tiny_nodes")):
        if not (custom / name).exists():
            (custom / name).symlink_to(target, target_is_directory=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(base_dir / "server.log", "w")  # noqa: SIM115 (closed at teardown)
    command = [str(Path(sys.executable).with_name("comfyui")), "--cpu", "--listen", "127.0.0.1", "--port",
               str(port), "--cwd", str(base_dir), "--disable-auto-launch"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                info = request(f"{url}/object_info/LinFusionApply")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"ComfyUI did not start: {(base_dir / 'server.log').read_text()[-3000:]}"
                    ) from None
                time.sleep(0.5)
        assert "LinFusionApply" in info
        yield url
    finally:
        process.terminate()  # stopped by its own PID
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def run_prompt(url: str, prompt: dict) -> dict:
    """POST the API-format prompt and poll /history until it finished; its history entry."""
    prompt_id = request(f"{url}/prompt", {"prompt": prompt})["prompt_id"]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        history = request(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"]["status_str"] != "pending":
                return entry
        time.sleep(0.25)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {RUN_TIMEOUT_S} s")


def tiny_version(workflow: dict, native: int, prefix: str) -> dict:
    """The workflow on the tiny model: its loader, weights, sizes divided so the base is 32 px, 2 steps."""
    scale = native // BASE_SIDE
    prompt = json.loads(json.dumps(workflow))
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = "LinFusionTestTinyCheckpoint", {"seed": 0}
        elif node["class_type"] == "LinFusionApply":
            inputs.update(weights="tiny-sd15", download=False)
        elif node["class_type"] == "KSampler":
            inputs["steps"] = min(inputs["steps"], 2)
        elif node["class_type"] in ("LinFusionVAEDecode", "LinFusionVAEEncode"):
            inputs["band_mb"] = 4
        elif node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = prefix
        for key in ("width", "height"):
            if key in inputs:
                assert inputs[key] % scale == 0
                inputs[key] //= scale
    return prompt


@pytest.mark.parametrize("size", ["4k", "8k", "16k"])
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_example_workflow_runs_in_the_server(server, base_dir, pack, model, size):
    examples = importlib.import_module(f"{pack.__name__}.example_workflows")
    workflow = json.loads((examples.FOLDER / f"sdedit-{model}-{size}.api.json").read_text())
    prefix = f"test-{model}-{size}"
    entry = run_prompt(server, tiny_version(workflow, examples.MODELS[model][1], prefix))
    assert entry["status"]["status_str"] == "success", entry["status"]
    side = examples.SIZES[size] // (examples.MODELS[model][1] // BASE_SIDE)
    pngs = sorted((base_dir / "output").glob(f"{prefix}_*.png"))
    assert len(pngs) == 1
    with Image.open(pngs[0]) as image:
        assert image.size == (side, side)
        assert len(set(image.convert("L").getdata())) > 10  # a picture, not a constant


def test_a_budget_too_small_fails_the_prompt_with_the_smallest(server):
    """Errors reach the user as ComfyUI reports them: the prompt fails with the node's one-line message."""
    prompt = {
        "1": {"class_type": "LinFusionTestTinyCheckpoint", "inputs": {"seed": 0}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 1}},
        "3": {"class_type": "LinFusionVAEDecode",
              "inputs": {"samples": ["2", 0], "vae": ["1", 2], "store_limit_mb": 1, "band_mb": 1,
                         "vae_attention": "exact", "store_on": "vae device", "device_store_mb": 0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "never"}},
    }  # fmt: skip
    entry = run_prompt(server, prompt)
    assert entry["status"]["status_str"] == "error"
    messages = json.dumps(entry["status"]["messages"])
    assert "smallest store that works at this size" in messages


def test_ui_widget_order_is_comfyuis(server, pack):
    """The UI-format files list widget values in the order ComfyUI's /object_info gives the inputs."""
    examples = importlib.import_module(f"{pack.__name__}.example_workflows")
    link_types = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE"}
    for class_type, widgets in examples.WIDGETS.items():
        required = request(f"{server}/object_info/{class_type}")[class_type]["input"]["required"]
        order = [
            name
            for name, spec in required.items()
            if not (isinstance(spec[0], str) and spec[0] in link_types)
        ]
        assert [name for name in widgets if name != "control_after_generate"] == order, class_type
