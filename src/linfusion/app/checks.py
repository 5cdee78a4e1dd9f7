"""The checks of a command-line run that need no model: each refuses, before anything loads, a request that
would fail or lose its image later (a folder that cannot be written, a disk too full for the PNG, a budget
or a device this machine does not have, an output that would replace its own source).

:func:`preflight` runs them all for :func:`linfusion.app.run.generate` and
:func:`~linfusion.app.run.upscale_file`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..choices import BUNDLED_MODEL_NAME
from ..io import format_size, probe_writable, size_flag
from ..pipelines.demofusion import DEMOFUSION_ON_DIT
from .loading import check_model_exists, names_dit, resolve_device
from .params import GenerationError, GenerationParams
from .prepare import Budgets

PNG_BYTES_PER_PIXEL = 3  # the most an 8-bit RGB PNG takes per pixel (noise does not compress)


def check_folder_writable(folder: Path, what: str) -> None:
    """Create ``folder`` when missing and prove it writable (:func:`linfusion.io.probe_writable`)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GenerationError(
            f"cannot write {what}: cannot create folder {folder} ({error.strerror})"
        ) from error
    try:
        probe_writable(folder)
    except OSError as error:
        raise GenerationError(
            f"cannot write {what}: folder {folder} is not writable ({error.strerror})"
        ) from error


def check_writable(out: Path) -> None:
    """Fail before any work if ``out`` cannot be written (its folder is created when missing)."""
    if out.suffix.lower() != ".png":
        raise GenerationError(f"--out {out}: the image is written as PNG, so the name must end in .png")
    if out.is_dir():
        raise GenerationError(f"cannot write {out}: it is a folder")
    check_folder_writable(out.parent, str(out))


def check_save_stages(folder: Path | None) -> None:
    """``--save-stages`` must name a folder (existing or new) that can be written."""
    if folder is None:
        return
    if folder.exists() and not folder.is_dir():
        raise GenerationError(
            f"--save-stages {folder} is a file, not a folder; name a folder for the stages' images"
        )
    check_folder_writable(folder, f"the stages' images in {folder}")


def check_free_space(out: Path, width: int | None, height: int | None) -> None:
    """Refuse a run whose PNG may not fit on the disk of ``out`` (counted at 3 bytes a pixel, uncompressed)."""
    if not width or not height:
        return
    needed = width * height * PNG_BYTES_PER_PIXEL
    free = shutil.disk_usage(out.parent).free
    if needed > free:
        raise GenerationError(
            f"the {width}x{height} PNG may take up to {format_size(needed)} and {out.parent} has "
            f"{format_size(free)} free; free some space or pass --out on another disk"
        )


def check_not_source(out: Path, source: Path) -> None:
    """Refuse an output that is the source image itself (under any path, through links too)."""
    same = out.resolve() == source.resolve()
    if not same and out.exists():
        try:
            same = os.path.samefile(out, source)
        except OSError:
            same = False
    if same:
        raise GenerationError(
            f"--out {out} is the image being enlarged ({source}); writing it would replace the original: "
            "pass another --out"
        )


def machine_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_host_budget(host_memory: int | None) -> None:
    """Refuse a host budget this machine does not have (a plan for another machine: ``linfusion plan``)."""
    total = machine_memory()
    if host_memory is not None and host_memory > total:
        raise GenerationError(
            f"--host-memory {size_flag(host_memory)} is more than this machine's {format_size(total)} of memory; "
            f"pass at most --host-memory {size_flag(total)} (to plan for another machine: linfusion plan)"
        )


def device_memory(device: torch.device) -> int:
    """Bytes of memory of ``device``: the GPU's own, or this machine's for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return machine_memory()


def check_device_budget(max_memory: int | None, device: torch.device) -> None:
    """Refuse a device budget larger than the device (a plan for another machine: ``linfusion plan``)."""
    if max_memory is None or device.type not in ("cpu", "cuda"):
        return
    total = device_memory(device)
    if max_memory > total:
        raise GenerationError(
            f"--max-memory {size_flag(max_memory)} is more than the {format_size(total)} of this {device.type}; "
            f"pass at most --max-memory {size_flag(total)} (to plan for another machine: linfusion plan)"
        )


def check_image_fits(width: int | None, height: int | None, device: torch.device) -> None:
    """Refuse, before anything loads, an image that alone outgrows this machine (as floats, then 8-bit).

    The memory planner refuses precisely once the model is loaded; this only spares loading a model for a
    size such as 100000x100000 that no saver can bring within this machine's memory.
    """
    if not width or not height:
        return
    needed = 3 * width * height * (4 + 1)
    available = machine_memory()
    if device.type == "cuda":
        available += device_memory(device)
    if needed > available:
        raise GenerationError(
            f"a {width}x{height} image alone needs {format_size(needed)} (as floats, then 8-bit), more than this "
            f"machine's {format_size(available)} of memory: choose a smaller size (linfusion plan shows what fits)"
        )


def preflight(
    params: GenerationParams,
    out: Path,
    device: str,
    budgets: Budgets,
    save_stages: Path | None = None,
) -> GenerationParams:
    """The checks that need no model, before anything loads; ``params`` with the model named."""
    if not isinstance(params, GenerationParams):
        raise GenerationError(
            f"the request must be a GenerationParams, such as GenerationParams(prompt='a red circle'); "
            f"got {type(params).__name__}"
        )
    params = params.replace(model=params.model or BUNDLED_MODEL_NAME)
    params.validate()
    check_model_exists(str(params.model))
    if params.mode == "demofusion" and names_dit(params.model):
        raise GenerationError(DEMOFUSION_ON_DIT)
    torch_device = resolve_device(device)
    check_writable(out)
    check_save_stages(save_stages)
    check_host_budget(budgets.host)
    check_device_budget(budgets.device, torch_device)
    check_image_fits(params.width, params.height, torch_device)
    check_free_space(out, params.width, params.height)
    return params


__all__ = [
    "check_device_budget",
    "check_folder_writable",
    "check_free_space",
    "check_host_budget",
    "check_image_fits",
    "check_not_source",
    "check_save_stages",
    "check_writable",
    "device_memory",
    "machine_memory",
    "preflight",
]
