"""Lets the index's torchvision wheel import next to the CPU build of torch in the test venv.

The torchvision wheels on the package index are CUDA builds: their compiled operators do not load with
the CPU torch, and torchvision then fails at import because it registers fake kernels for two of them
(``torchvision::nms``, ``torchvision::qnms``). Defining their schemas first lets it import (ComfyUI imports
torchvision; nothing here calls those operators). ``make comfyui-venv`` installs this module with a
``.pth`` line that calls :func:`install`, which waits for the first ``import torchvision`` (so other
programs in the venv do not pay for importing torch).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # the torch.library.Library that holds the definitions; kept alive for the process


def compiled_operators_load() -> bool:
    """True when torchvision's compiled operators load with this torch (a matching build): no shim then."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for library in (path for folder in folders for path in Path(folder).glob("_C*.so")):
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError):
            return False
        return True
    return False


def define_operators() -> None:
    """Define the operator schemas torchvision registers fake kernels for, unless they exist."""
    global _library
    import torch

    if _library is not None or compiled_operators_load():
        return
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _library.define(schema)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Defines the operators when ``torchvision`` is first imported, then lets the normal import run."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name == "torchvision":
            sys.meta_path.remove(self)
            define_operators()
        return None


def install() -> None:
    sys.meta_path.insert(0, _BeforeTorchvision())
