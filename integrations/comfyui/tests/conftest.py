"""Set-up shared by the node pack's tests: ComfyUI on the CPU, its folders in a temporary directory, the
node pack imported as ComfyUI imports custom nodes, and the tiny models."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
PACK = TESTS.parent
sys.path.insert(0, str(TESTS))

import comfy.cli_args  # noqa: E402
from tiny_nodes import tiny_models  # noqa: E402

BASE = Path(tempfile.mkdtemp(prefix="linfusion-comfyui-"))
comfy.cli_args.args.cwd = str(BASE)  # folder_paths reads it when first imported: models/ output/ under BASE
tiny_models.use_cpu()
torch.set_num_threads(1)  # the CI machine has 2 cores, shared


def load_pack(name: str = "linfusion_comfyui"):
    """The node pack imported from its folder under ``name``, as ComfyUI's custom-node loader does."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PACK / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session", autouse=True)
def base_dir():
    """ComfyUI's folders for this run (models/, output/, custom_nodes/ ...), removed at the end."""
    yield BASE
    shutil.rmtree(BASE, ignore_errors=True)  # custom_nodes/ holds symlinks: removed, not followed


def save_tiny_linfusion(folder: Path, unet, seed: int = 1) -> None:
    """Random (seeded) LinFusion weights for the tiny UNet, saved as a ComfyUI models/linfusion folder."""
    from linfusion import LinFusion

    torch.manual_seed(seed)
    LinFusion.from_unet(unet).save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_weights(pack) -> str:
    """The name of the tiny LinFusion weights under models/linfusion/ (made once per session)."""
    from comfy.cmd import folder_paths

    name = "tiny-sd15"
    folder = Path(folder_paths.get_folder_paths("linfusion")[0]) / name
    if not (folder / "config.json").exists():
        save_tiny_linfusion(folder, tiny_models.diffusers_unet())
    return name
