"""Which model, on which device, in which dtype, with which attention: everything before the first step.

:func:`load` turns :class:`~linfusion.app.params.GenerationParams` into a :class:`LoadedPipeline`: the
diffusers pipeline with its scheduler, LinFusion mounted (or not) and the VAE attention kernel chosen, and
one :class:`~linfusion.patches.Patch` that undoes every change made to the models. Loading is the slow part,
so a long-lived caller (the web UI) keeps the pipeline and reapplies only what differs between jobs.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..bundled.paths import DIT_MODEL_DIR
from ..choices import BUNDLED_DIT_MODEL_NAME, BUNDLED_MODEL_NAME, SCHEDULERS
from ..errors import excerpt
from ..hub import load_failure_message, looks_like_hub_id
from ..model import LinFusion
from ..patches.base import Patch
from ..patches.vae_attention import apply_vae_attention
from ..pipelines.chain import minimum_side, native_long_side
from ..pipelines.dit import max_sequence_length
from ..registry import is_dit, is_sdxl
from .params import GenerationError, GenerationParams

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "bundled" / "model"
LINFUSION_SUBFOLDER = "linfusion"
# Models whose VAE's linear mid-block attention was measured against the exact one (auto picks it there).
LINEAR_VAE_ATTENTION_MEASURED = {
    BUNDLED_MODEL_NAME: "45.7-48.1 dB PSNR from the exact VAE at 32-512 px, benchmarks/results/vae-attention-bundled.md",
}


def auto_vae_attention(model: str | None, tokens: int) -> str:
    """What ``--vae-attention auto`` runs for ``model``'s VAE at ``tokens`` mid-block tokens.

    Exact while the softmax attention is cheap (fewer than ``QUADRATIC_HINT_TOKENS``); beyond, linear where
    its fidelity on this VAE is measured (:data:`LINEAR_VAE_ATTENTION_MEASURED`), else still exact (the
    caller warns). ``linfusion generate`` and ``linfusion plan`` decide with this one rule.
    """
    from ..vae_attention import QUADRATIC_HINT_TOKENS

    if tokens >= QUADRATIC_HINT_TOKENS and LINEAR_VAE_ATTENTION_MEASURED.get(model or ""):
        return "linear"
    return "exact"


RANDOM_MODELS = {"random-sd15": "sd15", "random-sdxl": "sdxl"}  # full size, random weights: no download
RANDOM_MODELS["random-pixart-sigma"] = "pixart-sigma"
RANDOM_MODELS["random-pixart-alpha"] = "pixart-alpha"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_model(model: str | None) -> str:
    """The folder or Hub id behind ``--model`` (None and "bundled": the bundled model's folder;
    "bundled-dit": the bundled DiT's)."""
    if model == BUNDLED_DIT_MODEL_NAME:
        return str(DIT_MODEL_DIR)
    return str(BUNDLED_MODEL) if model in (None, BUNDLED_MODEL_NAME) else model


def pipeline_class_name(model: str | None) -> str | None:
    """The pipeline class ``model_index.json`` names for ``--model`` (a folder, a bundled name, a Hub id
    already in the local cache), read without loading anything; None when it cannot be read here."""
    import json

    folder = Path(resolve_model(model))
    index = folder / "model_index.json"
    if not index.exists() and looks_like_hub_id(str(model)):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(model), "model_index.json")
        index = Path(cached) if isinstance(cached, str) else index
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def names_dit(model: str | None) -> bool:
    """Whether ``--model`` names a diffusion-transformer (PixArt) pipeline, known before loading it."""
    if str(model).startswith("random-pixart"):
        return True
    return (pipeline_class_name(model) or "").startswith("PixArt")


def is_bundled(model: str | None) -> bool:
    """Whether ``--model`` names the bundled model (by name or by its folder)."""
    return Path(resolve_model(model)).resolve() == BUNDLED_MODEL


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU; a device this machine lacks is refused here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise GenerationError(
            f"unknown device {excerpt(device)}; use cpu, cuda, cuda:1, ... or auto"
        ) from error
    if resolved.type == "meta":
        raise GenerationError(
            "device meta holds shapes without values, so it cannot make an image; use cpu, cuda or auto "
            "(linfusion plan plans a run without running it)"
        )
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise GenerationError(
                f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu or auto"
            )
        if resolved.index is not None and resolved.index >= count:
            raise GenerationError(
                f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    elif resolved.type != "cpu" and not device_available(resolved.type):
        raise GenerationError(
            f"--device {device}: this machine has no {resolved.type} device; use cpu or auto"
        )
    return resolved


def device_available(kind: str) -> bool:
    """Whether torch can use a device of type ``kind`` (mps, xpu, ...) on this machine."""
    if kind == "mps":
        return torch.backends.mps.is_available()
    is_available = getattr(getattr(torch, kind, None), "is_available", None)
    return bool(is_available()) if callable(is_available) else False


def check_model_exists(model: str) -> None:
    """Refuse, before loading, a ``--model`` that is neither a known name, an existing path nor a Hub id."""
    if model in RANDOM_MODELS or model in (BUNDLED_MODEL_NAME, BUNDLED_DIT_MODEL_NAME):
        return
    if looks_like_hub_id(model):
        return
    if not Path(model).exists():
        raise GenerationError(
            f"--model {excerpt(model)}: no such folder; pass a diffusers pipeline folder, a Hub id such as "
            f"org/name, {BUNDLED_MODEL_NAME} or {BUNDLED_DIT_MODEL_NAME}"
        )


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA, fp32 elsewhere."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A text-to-image pipeline from a local folder or a Hub id, with a clear error when neither works.

    ``random-sd15`` / ``random-sdxl`` build a full-size pipeline with random weights on ``device`` (for
    timings and memory plans without downloads; ``meta`` builds the structure alone).
    """
    from diffusers import AutoPipelineForText2Image

    if model in RANDOM_MODELS:
        from ..testing.full_size import random_full_size_pipeline

        return random_full_size_pipeline(RANDOM_MODELS[model], dtype, device)

    if model == str(BUNDLED_MODEL) and not (BUNDLED_MODEL / "model_index.json").exists():
        raise GenerationError(
            f"the bundled model is not in this installation ({BUNDLED_MODEL}); pass --model with a diffusers "
            "pipeline folder or Hub id"
        )
    if model == str(DIT_MODEL_DIR) and not (DIT_MODEL_DIR / "model_index.json").exists():
        raise GenerationError(
            f"the bundled DiT is not in this installation ({DIT_MODEL_DIR}); pass --model with a PixArt "
            "pipeline folder or Hub id"
        )
    try:
        if not looks_like_hub_id(model) and not (Path(model) / "model_index.json").exists():
            raise FileNotFoundError(f"no model_index.json in {model}")
        pipe = AutoPipelineForText2Image.from_pretrained(model, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        needs = "model_index.json and the component folders (as a pipeline's save_pretrained writes)"
        raise GenerationError(load_failure_message("the model", model, error, needs)) from error
    return pipe.to(device)


def load_structure(model: str, dtype: torch.dtype) -> Any:
    """The pipeline's models built on the ``meta`` device from their configs: shapes and sizes, no weights.

    What the memory planner needs to plan for any machine without loading (or downloading) weights: a
    local pipeline folder, a Hub id already in the local cache, the bundled model, or ``random-sd15`` /
    ``random-sdxl``. LinFusion is mounted (the folder's own ``linfusion/`` layers when it has them, as
    :func:`attach_linfusion` picks them, else the registry's default shape) unless the caller removes it.
    """
    import json
    from types import SimpleNamespace

    import diffusers
    import transformers

    if model in RANDOM_MODELS:
        from ..testing.full_size import random_full_size_pipeline

        pipe = random_full_size_pipeline(RANDOM_MODELS[model], dtype, "meta")
        LinFusion.construct_for(pipe, load_pretrained=False)
        return pipe
    folder = _local_pipeline_folder(model)
    index = json.loads((folder / "model_index.json").read_text())
    parts: dict[str, Any] = {"tokenizer": SimpleNamespace(model_max_length=_prompt_tokens(folder))}
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "controlnet"):
        library, class_name = (index.get(name) or (None, None))[:2]
        if library is None or class_name is None:
            continue
        with torch.device("meta"):
            if library == "diffusers":
                model_class = getattr(diffusers, class_name)
                parts[name] = model_class.from_config(model_class.load_config(folder / name)).to(dtype)
            else:
                config = transformers.AutoConfig.from_pretrained(folder / name)
                parts[name] = getattr(transformers, class_name)(config).to(dtype)
    denoiser = parts.get("unet", parts.get("transformer"))
    if denoiser is None or "vae" not in parts:
        raise GenerationError(
            f"{model} is neither a Stable Diffusion nor a PixArt pipeline (no unet or transformer, or no vae, "
            "in model_index.json)"
        )
    if "transformer" in parts:  # T5 reads the pipeline's max_sequence_length tokens, not the tokenizer's
        pipeline_class = getattr(diffusers, index.get("_class_name", ""), None)
        if pipeline_class is not None:
            parts["tokenizer"] = SimpleNamespace(model_max_length=max_sequence_length(pipeline_class))
    structure = SimpleNamespace(
        **parts, vae_scale_factor=2 ** (len(parts["vae"].config.block_out_channels) - 1)
    )
    own = folder / LINFUSION_SUBFOLDER / "config.json"  # the model's own LinFusion, as generate mounts it
    if own.exists():
        with torch.device("meta"):
            modules = LinFusion.load_config(own.parent)["modules_list"]
            linfusion = LinFusion(modules_list=modules).to(dtype)
    else:
        linfusion = LinFusion.from_unet(denoiser)  # on meta, like the denoiser
    linfusion.mount(denoiser)
    return structure


def _prompt_tokens(folder: Path) -> int:
    """The tokens of an encoded prompt (the cross-attention's context): the tokenizer's length, else CLIP's 77."""
    import json

    config = folder / "tokenizer" / "tokenizer_config.json"
    if config.exists():
        length = json.loads(config.read_text()).get("model_max_length")
        if isinstance(length, int) and 0 < length < 10**6:  # transformers writes 1e30 for "unbounded"
            return length
    return 77


def _local_pipeline_folder(model: str) -> Path:
    """The folder holding ``model``'s configs: itself, or its snapshot in the Hub cache (configs only)."""
    folder = Path(resolve_model(model))
    if (folder / "model_index.json").exists():
        return folder
    if not looks_like_hub_id(model):
        raise GenerationError(f"no model_index.json in {model}: pass a diffusers pipeline folder or a Hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.txt"]))
    except Exception as error:  # noqa: BLE001 - any Hub failure becomes one message
        needs = "model_index.json and the component config.json files"
        raise GenerationError(load_failure_message("the model's configs", model, error, needs)) from error


def use_scheduler(pipe: Any, name: str | None) -> str:
    """Put the scheduler ``name`` (a key of ``SCHEDULERS``) on ``pipe``; returns the name now in use.

    Without ``name`` the pipeline keeps its own scheduler, named as ``--scheduler`` would name it.
    """
    if name:
        import diffusers

        scheduler_class = getattr(diffusers, SCHEDULERS[name])
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
        return name
    own = type(pipe.scheduler).__name__
    return next((key for key, cls in SCHEDULERS.items() if cls == own), own)


def attach_linfusion(pipe: Any, model: str, choice: str) -> LinFusion | None:
    """Mount LinFusion per ``choice``: "none", a Hub id/folder, or "auto".

    "auto" uses the model folder's own ``linfusion/`` subfolder when it has one (the bundled model does),
    else the registry (model id, then UNet architecture).
    """
    if choice == "none":
        return None
    if choice != "auto":
        return LinFusion.construct_for(pipe, pretrained_model_name_or_path=choice)
    if model in RANDOM_MODELS:  # random weights want random LinFusion layers of the right shape
        return LinFusion.construct_for(pipe, load_pretrained=False)
    own = Path(model) / LINFUSION_SUBFOLDER
    if (own / "config.json").exists():
        return LinFusion.construct_for(pipe, pretrained_model_name_or_path=own)
    if is_dit(pipe):
        raise GenerationError(
            f"no LinFusion weights are published for diffusion transformers, and {excerpt(model)} has no "
            f"{LINFUSION_SUBFOLDER}/ folder: distill them (linfusion distill --teacher {shlex.quote(model)} "
            f"--data <images> --output <folder>) and pass --linfusion <folder> (or save them as "
            f"{LINFUSION_SUBFOLDER}/ in the model folder). Or run without LinFusion: --no-linfusion."
        )
    try:
        return LinFusion.construct_for(pipe, pipe_name_path=model)
    except LookupError as error:
        raise GenerationError(f"{error} Or run without LinFusion: --no-linfusion.") from error


@dataclass(frozen=True)
class LoadedPipeline:
    """A pipeline ready to run ``params``; ``patch.remove()`` undoes LinFusion and the VAE kernel."""

    pipe: Any
    device: torch.device
    params: GenerationParams  # with the model and scheduler resolved
    patch: Patch

    @property
    def native_size(self) -> int:
        """The side in pixels of the images the UNet was trained at."""
        return native_long_side(self.pipe)

    @property
    def minimum_side(self) -> int:
        """The smallest width and height in pixels this model works at."""
        return minimum_side(self.pipe)

    @property
    def is_sdxl(self) -> bool:
        return is_sdxl(self.pipe)

    @property
    def is_dit(self) -> bool:
        """A diffusion transformer (PixArt): no UNet, so no UNet-only memory savers or recipes."""
        return is_dit(self.pipe)


def load(params: GenerationParams, device: str = "auto") -> LoadedPipeline:
    """Load the pipeline ``params`` names, with its scheduler, LinFusion and VAE attention in place.

    Under ``torchrun`` (WORLD_SIZE > 1) the pipeline is also made spatial-parallel.
    """
    from ..parallel.launch import enable_for_pipeline

    params = params.replace(model=params.model or BUNDLED_MODEL_NAME)
    torch_device = resolve_device(device)
    model = resolve_model(params.model)
    pipe = load_pipeline(model, torch_device, resolve_dtype(params.dtype, torch_device))
    params = params.replace(scheduler=use_scheduler(pipe, params.scheduler))
    patch = Patch("loaded pipeline")
    linfusion = attach_linfusion(pipe, model, params.linfusion)
    if linfusion is not None:
        patch.on_remove(linfusion.unmount)
    if params.vae_attention != "auto":  # "auto" is chosen once the stages are known (app.run)
        patch.add(apply_vae_attention(pipe.vae, params.vae_attention))
    enable_for_pipeline(pipe)  # under torchrun (WORLD_SIZE > 1): spatial-parallel, else nothing
    return LoadedPipeline(pipe, torch_device, params, patch)


__all__ = [
    "BUNDLED_MODEL",
    "DTYPES",
    "LINEAR_VAE_ATTENTION_MEASURED",
    "RANDOM_MODELS",
    "LoadedPipeline",
    "attach_linfusion",
    "auto_vae_attention",
    "check_model_exists",
    "is_bundled",
    "load",
    "load_pipeline",
    "names_dit",
    "pipeline_class_name",
    "resolve_device",
    "resolve_dtype",
    "resolve_model",
    "use_scheduler",
]
