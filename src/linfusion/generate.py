"""``linfusion generate``: one image from a prompt, with LinFusion mounted, reproducible from its PNG.

The PNG carries every setting in a text chunk named ``parameters`` in the format the common SD web UIs
write (prompt, ``Negative prompt: ...``, then ``Key: value`` pairs), so ``linfusion generate --from-png``
(or any of those UIs) can make the same image again.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .vae_attention import VAE_ATTENTION_MODES, quadratic_attention_hint, set_vae_attention

logger = logging.getLogger(__name__)

BUNDLED_MODEL = Path(__file__).resolve().parent / "bundled" / "model"
BUNDLED_NAME = (
    "bundled"  # --model bundled (the default) and the PNG's "Model: bundled": portable across installs
)


def resolve_model(model: str | None) -> str:
    """The folder or Hub id behind ``--model`` (None and "bundled": the bundled model's folder)."""
    return str(BUNDLED_MODEL) if model in (None, BUNDLED_NAME) else model


LINFUSION_SUBFOLDER = "linfusion"

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("plain", "sdedit", "demofusion")


class GenerationError(ValueError):
    """The request cannot be generated; the message says what to change."""


@dataclass
class GenerationParams:
    """Everything that determines the image (and what the PNG's ``parameters`` chunk records)."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    scheduler: str | None = None
    model: str | None = None
    linfusion: str = "auto"  # "auto", "none", or a Hub id / folder
    dtype: str = "auto"
    mode: str = "plain"  # "plain": one pass at the size; "sdedit": native size, then enlargement stages
    vae_attention: str = "exact"  # "exact" (the VAE's softmax) or "linear" (linfusion.vae_attention)

    def validate(self) -> None:
        if not self.prompt or not self.prompt.strip():
            raise GenerationError(
                'the prompt is empty: say what to draw, e.g. linfusion generate "a red circle"'
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 8):
                suggestion = max(8, round(value / 8) * 8)
                raise GenerationError(
                    f"{name} {value} is not a positive multiple of 8 (the VAE works in blocks of 8 pixels); "
                    f"try {suggestion}"
                )
        if self.steps < 1:
            raise GenerationError(f"--steps must be >= 1; got {self.steps}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise GenerationError(
                f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}"
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise GenerationError(f"unknown dtype {self.dtype!r}; choose auto, {', '.join(DTYPES)}")
        if self.mode not in MODES:
            raise GenerationError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.vae_attention not in VAE_ATTENTION_MODES:
            raise GenerationError(
                f"unknown VAE attention {self.vae_attention!r}; choose one of {', '.join(VAE_ATTENTION_MODES)}"
            )

    # ------------------------------------------------------------------ the PNG text chunk
    _KEYS = {
        "steps": "Steps",
        "scheduler": "Sampler",
        "guidance": "CFG scale",
        "seed": "Seed",
        "model": "Model",
        "linfusion": "LinFusion",
        "dtype": "Dtype",
        "mode": "Mode",
        "vae_attention": "VAE attention",
    }

    def to_text(self) -> str:
        """``parameters`` text: prompt, negative prompt, then ``Key: value`` pairs (web-UI convention)."""
        pairs = [f"{label}: {getattr(self, name)}" for name, label in self._KEYS.items() if name != "model"]
        pairs.insert(3, f"Size: {self.width}x{self.height}")
        pairs.append(f"Model: {self.model}")
        text = self.prompt
        if self.negative_prompt:
            text += f"\nNegative prompt: {self.negative_prompt}"
        return text + "\n" + ", ".join(pairs)

    @classmethod
    def from_text(cls, text: str) -> GenerationParams:
        lines = text.strip().split("\n")
        settings_line = lines[-1]
        negative = ""
        body = lines[:-1]
        if body and body[-1].startswith("Negative prompt: "):
            negative = body.pop().removeprefix("Negative prompt: ")
        values: dict[str, str] = dict(
            re.findall(r"(?:^|, )([A-Za-z ]+): ((?:(?!, [A-Za-z ]+: ).)*)", settings_line)
        )
        if "Steps" not in values:
            raise GenerationError(
                "the parameters text has no 'Steps: ...' line; it was not written by a SD tool"
            )
        labels = {label: name for name, label in cls._KEYS.items()}
        convert = {"steps": int, "seed": int, "guidance": float}
        params: dict[str, Any] = {"prompt": "\n".join(body), "negative_prompt": negative}
        for label, raw in values.items():
            if label == "Size":
                width, height = raw.split("x")
                params["width"], params["height"] = int(width), int(height)
            elif label in labels:
                name = labels[label]
                params[name] = convert.get(name, str)(raw)
        if params.get("scheduler") not in SCHEDULERS:
            params["scheduler"] = None  # the model's own scheduler, which is what made the image
        if params.get("model") == "None":
            params["model"] = None
        return cls(**params)


def read_png_parameters(path: str | os.PathLike) -> GenerationParams:
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get("parameters")
    if not text:
        raise GenerationError(
            f"{path} has no 'parameters' text chunk (was it written by linfusion generate?)"
        )
    return GenerationParams.from_text(text)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A text-to-image pipeline from a local folder or a Hub id, with a clear error when neither works."""
    from diffusers import AutoPipelineForText2Image

    from .hub import load_failure_message, looks_like_hub_id

    if model == str(BUNDLED_MODEL) and not (BUNDLED_MODEL / "model_index.json").exists():
        raise GenerationError(
            f"the bundled model is not in this installation ({BUNDLED_MODEL}); pass --model with a diffusers "
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


def attach_linfusion(pipe: Any, model: str, choice: str) -> Any:
    """Mount LinFusion per ``choice``: "none", a Hub id/folder, or "auto".

    "auto" uses the model folder's own ``linfusion/`` subfolder when it has one (the bundled model does),
    else the registry (model id, then UNet architecture).
    """
    from .model import LinFusion

    if choice == "none":
        return None
    if choice != "auto":
        return LinFusion.construct_for(pipe, pretrained_model_name_or_path=choice)
    own = Path(model) / LINFUSION_SUBFOLDER
    if (own / "config.json").exists():
        return LinFusion.construct_for(pipe, pretrained_model_name_or_path=own)
    try:
        return LinFusion.construct_for(pipe, pipe_name_path=model)
    except LookupError as error:
        raise GenerationError(f"{error} Or run without LinFusion: --no-linfusion.") from error


def check_writable(out: Path) -> None:
    """Fail before any work if ``out`` cannot be written (its folder is created when missing)."""
    if out.suffix.lower() != ".png":
        raise GenerationError(f"--out {out}: the image is written as PNG, so the name must end in .png")
    if out.is_dir():
        raise GenerationError(f"cannot write {out}: it is a folder")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GenerationError(
            f"cannot write {out}: cannot create folder {parent} ({error.strerror})"
        ) from error
    if not os.access(parent, os.W_OK):
        raise GenerationError(f"cannot write {out}: folder {parent} is not writable")


def save_png(image: Any, params: GenerationParams, out: Path) -> Path:
    """Write the PNG with its ``parameters`` chunk through a temporary file and a rename (no partial files)."""
    from PIL import PngImagePlugin

    from .parallel.launch import is_main_process

    if not is_main_process():
        return out  # a spatial-parallel run: only rank 0 writes the file
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params.to_text())
    descriptor, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or ".")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return out


def prepare(params: GenerationParams, out: Path, device: str) -> tuple[Any, Any, torch.device]:
    """Checks (before the model loads), then the pipeline with scheduler and LinFusion in place."""
    params.model = params.model or BUNDLED_NAME
    params.validate()
    check_writable(out)
    torch_device = _resolve_device(device)
    pipe = load_pipeline(
        resolve_model(params.model), torch_device, _resolve_dtype(params.dtype, torch_device)
    )
    if params.scheduler:
        import diffusers

        scheduler_class = getattr(diffusers, SCHEDULERS[params.scheduler])
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    linfusion = attach_linfusion(pipe, resolve_model(params.model), params.linfusion)
    set_vae_attention(pipe.vae, params.vae_attention)
    from .parallel.launch import enable_for_pipeline

    enable_for_pipeline(pipe)  # under torchrun (WORLD_SIZE > 1): spatial-parallel, else nothing
    params.scheduler = params.scheduler or next(
        (name for name, cls in SCHEDULERS.items() if cls == type(pipe.scheduler).__name__),
        type(pipe.scheduler).__name__,
    )
    return pipe, linfusion, torch_device


def plan_memory(
    pipe: Any,
    sizes: list[tuple[int, int]],
    encodes: list[bool],
    max_memory: str | None,
    guidance: float,
    quiet: bool,
) -> Any:
    """The memory plan for these stages (printed), or a GenerationError that names the smallest budget."""
    import sys

    from .planner import MemoryBudgetError, MemoryPlanner

    try:
        plan = MemoryPlanner(pipe).plan(sizes, budget=max_memory, guidance=guidance > 1.0, encodes=encodes)
    except MemoryBudgetError as error:
        raise GenerationError(str(error)) from error
    except ValueError as error:  # an unreadable --max-memory
        raise GenerationError(str(error)) from error
    if not quiet:
        print(plan.describe(), file=sys.stderr)
        hint = quadratic_attention_hint(pipe.vae, sizes)
        if hint:
            print(hint, file=sys.stderr)
    return plan


def generate(
    params: GenerationParams,
    out: str | os.PathLike,
    device: str = "auto",
    callback_on_step_end: Any = None,
    progress: bool = True,
    save_stages: str | os.PathLike | None = None,
    max_memory: str | None = None,
) -> Path:
    """Generate ``params`` and write the PNG to ``out``; every check runs before the model loads.

    A memory plan for ``max_memory`` (default: the device's free memory) picks the savers each stage
    needs; a request that cannot fit is refused before any denoising starts.
    """
    out_path = Path(out)
    pipe, linfusion, torch_device = prepare(params, out_path, device)
    pipe.set_progress_bar_config(disable=not progress, desc="generate")
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    params.width = params.width or native
    params.height = params.height or native
    common = {
        "negative_prompt": params.negative_prompt or None,
        "num_inference_steps": params.steps,
        "guidance_scale": params.guidance,
        "generator": torch.Generator(torch_device).manual_seed(params.seed),
        "callback_on_step_end": callback_on_step_end,
    }
    try:
        if params.mode in ("sdedit", "demofusion"):
            from .pipelines import demofusion, plan_stages, sdedit

            stages = plan_stages(params.width, params.height, native, sdxl=hasattr(pipe, "text_encoder_2"))
            sizes = [(stage.width, stage.height) for stage in stages]
            encodes = [stage.strength is not None for stage in stages]
            plan = plan_memory(pipe, sizes, encodes, max_memory, params.guidance, not progress)
            image = (sdedit if params.mode == "sdedit" else demofusion)(
                pipe,
                params.prompt,
                params.width,
                params.height,
                save_stages=save_stages,
                memory_plan=plan,
                **common,
            )
        else:
            from .pipelines.sdedit import stage_memory

            size = (params.width, params.height)
            plan = plan_memory(pipe, [size], [False], max_memory, params.guidance, not progress)
            with stage_memory(pipe, plan.stages[0].savers, params.width * params.height, None):
                image = pipe(params.prompt, width=params.width, height=params.height, **common).images[0]
    finally:
        if linfusion is not None:
            linfusion.unmount()
    return save_png(image, params, out_path)


def upscale_file(
    source: str | os.PathLike,
    scale: float,
    params: GenerationParams,
    out: str | os.PathLike,
    device: str = "auto",
    progress: bool = True,
    save_stages: str | os.PathLike | None = None,
    max_memory: str | None = None,
) -> Path:
    """Enlarge the image at ``source`` by ``scale`` with SDEdit (or, with ``params.mode`` "demofusion",
    DemoFusion) stages guided by ``params.prompt``."""
    from PIL import Image

    from .pipelines import upscale

    try:
        with Image.open(source) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError) as error:
        raise GenerationError(f"cannot read the image {source}: {error}") from error
    if scale <= 1:
        raise GenerationError(f"--scale must be > 1; got {scale}")
    params.prompt = params.prompt or "high quality, detailed"
    params.mode = params.mode if params.mode == "demofusion" else "sdedit"
    out_path = Path(out)
    pipe, linfusion, torch_device = prepare(params, out_path, device)
    pipe.set_progress_bar_config(disable=not progress)
    from .pipelines import plan_stages, upscale_target

    stages = plan_stages(*upscale_target(image.size, scale), base_long_side=max(image.size), start=image.size)
    sizes = [(stage.width, stage.height) for stage in stages]
    plan = plan_memory(pipe, sizes, [True] * len(sizes), max_memory, params.guidance, not progress)
    try:
        result = upscale(
            pipe,
            image,
            scale,
            prompt=params.prompt,
            mode=params.mode,
            negative_prompt=params.negative_prompt or None,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance,
            generator=torch.Generator(torch_device).manual_seed(params.seed),
            save_stages=save_stages,
            memory_plan=plan,
        )
    finally:
        if linfusion is not None:
            linfusion.unmount()
    params.width, params.height = result.size
    return save_png(result, params, out_path)
