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
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # the torch.library.Library that holds the definitions; kept alive for the process


def define_operators() -> None:
    """Define the operator schemas torchvision registers fake kernels for, unless they exist."""
    global _library
    import torch

    if _library is not None or hasattr(torch.ops.torchvision, "nms"):
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
