"""The teacher: a diffusers SD-1.x / SD-2.x / SD-XL or PixArt-Alpha / PixArt-Sigma pipeline, how it turns
captions into conditioning, and how its denoiser is called."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from torch import nn

from ..bundled.paths import DIT_MODEL_DIR, MODEL_DIR
from ..choices import BUNDLED_DIT_MODEL_NAME, BUNDLED_MODEL_NAME
from ..errors import UserError
from ..hub import load_failure_message, looks_like_hub_id
from ..pipelines.dit import max_sequence_length
from ..registry import UNSUPPORTED_DENOISERS, UnsupportedModelError, check_linearizable, is_dit, is_sdxl

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# PixArt-Alpha / PixArt-Sigma: a transformer with a T5 text encoder in place of the UNet and CLIP.
TRANSFORMER_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
SUPPORTED_TEACHERS = "SD-1.x, SD-2.x, SD-XL, PixArt-Alpha and PixArt-Sigma text-to-image pipelines"


class TeacherError(UserError, ValueError):
    """The teacher cannot be used for distillation; the message says why."""


def resolve_teacher(name_or_path: str) -> str:
    """The folder or Hub id behind ``--teacher`` ("bundled" / "bundled-dit": the bundled models' folders, as
    for generate)."""
    named = {BUNDLED_MODEL_NAME: MODEL_DIR, BUNDLED_DIT_MODEL_NAME: DIT_MODEL_DIR}
    return str(named[name_or_path]) if name_or_path in named else name_or_path


def check_teacher_source(name_or_path: str) -> None:
    """Refuse a ``--teacher`` that is neither a pipeline folder nor a Hub id, without loading anything."""
    source = resolve_teacher(name_or_path)
    if looks_like_hub_id(source):
        return
    if not os.path.exists(source):
        raise TeacherError(
            f"--teacher {name_or_path!r}: no such folder; pass a diffusers pipeline folder (with "
            f"model_index.json), a Hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5, or "
            f"{BUNDLED_MODEL_NAME} or {BUNDLED_DIT_MODEL_NAME}"
        )
    index = os.path.join(source, "model_index.json")
    if not os.path.isfile(index):
        raise TeacherError(
            f"could not load the teacher {name_or_path!r} as a diffusers pipeline: the folder has no "
            "model_index.json. Pass a Hub id or a folder written by save_pretrained (with model_index.json)"
        )
    entries = read_pipeline_index(source)
    if entries is not None:
        check_denoiser_entry(entries, name_or_path)


def read_pipeline_index(source: str) -> dict[str, Any] | None:
    """A local pipeline folder's ``model_index.json``; None for a Hub id or an unreadable index (the loader
    then says what is wrong with it)."""
    try:
        with open(os.path.join(source, "model_index.json"), encoding="utf-8") as file:
            entries = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return entries if isinstance(entries, dict) else None


def check_denoiser_entry(entries: dict[str, Any], name: str) -> None:
    """Refuse, from ``model_index.json`` alone, a pipeline whose transformer cannot be linearized or is missing.

    Loading such a teacher (SD3's three text encoders, FLUX's 12 B transformer) would be wasted work.
    """
    if "transformer" not in entries or entries.get("unet"):
        return
    entry = entries["transformer"]
    class_name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if class_name in UNSUPPORTED_DENOISERS:
        raise TeacherError(f"cannot distill {name!r}: {unsupported_message(class_name)}")
    if class_name is None:
        raise TeacherError(
            f"{name!r} is a {entries.get('_class_name', 'pipeline')} without its transformer "
            "(model_index.json lists none); pass the complete pipeline folder"
        )


def unsupported_message(class_name: str) -> str:
    """The registry's reason why LinFusion cannot linearize a denoiser class (as ``check_linearizable`` says)."""
    return (
        f"LinFusion cannot be mounted on {class_name}: {UNSUPPORTED_DENOISERS[class_name]}. LinFusion distills "
        f"{SUPPORTED_TEACHERS}"
    )


def _without_unshown_references(message: str) -> str:
    """A library's error text minus sentences pointing at a traceback the user is not shown."""
    sentences = re.split(r"(?<=[.!?])\s+", str(message).strip())
    return " ".join(s for s in sentences if "stacktrace" not in s.lower() and "traceback" not in s.lower())


def load_teacher(name_or_path: str, dtype: torch.dtype = torch.float32) -> Any:
    """Load a teacher pipeline (Hub id, local folder or ``bundled``) and check LinFusion can distill it."""
    from diffusers import DiffusionPipeline

    check_teacher_source(name_or_path)
    source = resolve_teacher(name_or_path)
    try:
        entries = read_pipeline_index(source)
        # No safety checker for training; PixArt pipelines have none (diffusers warns when it is passed).
        extra = {} if entries is not None and "safety_checker" not in entries else {"safety_checker": None}
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, **extra)
    except (OSError, ValueError, TypeError) as error:
        text = _without_unshown_references(str(error)).rstrip(".")
        if looks_like_hub_id(source):
            try:
                cleaned = type(error)(text)
            except TypeError:  # an exception class with another constructor: keep the text only
                cleaned = RuntimeError(text)
            message = load_failure_message("the teacher", name_or_path, cleaned, "model_index.json")
        else:  # an existing pipeline folder (checked above) with a broken file
            message = f"could not load the teacher {name_or_path!r} as a diffusers pipeline: {text}"
        raise TeacherError(
            f"{message}. Pass a Hub id or a folder written by save_pretrained (with model_index.json)"
        ) from error
    check_teacher(pipe, name_or_path)
    return pipe


def check_teacher(pipe: Any, name: str = "teacher") -> None:
    """Refuse a pipeline LinFusion cannot distill, saying why (missing parts, an unsupported denoiser)."""
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        try:
            check_linearizable(transformer)
        except UnsupportedModelError as error:
            raise TeacherError(f"cannot distill {name!r}: {error}") from error
    dit = is_dit(pipe) or (
        getattr(pipe, "unet", None) is None and "transformer" in getattr(pipe, "components", {})
    )
    required = TRANSFORMER_COMPONENTS if dit else REQUIRED_COMPONENTS
    missing = [c for c in required if getattr(pipe, c, None) is None]
    if missing:
        kind = "a complete PixArt pipeline" if dit else "a Stable Diffusion pipeline"
        raise TeacherError(
            f"{name!r} is a {type(pipe).__name__}, not {kind}: it has no {', '.join(missing)} "
            f"(LinFusion distills {SUPPORTED_TEACHERS})"
        )
    if dit and not isinstance(transformer, PixArtTransformer2DModel):
        raise TeacherError(
            f"{name!r} has a {type(transformer).__name__}; of the diffusion transformers LinFusion distills "
            "PixArtTransformer2DModel (PixArt-Alpha, PixArt-Sigma)"
        )
    if not dit and not isinstance(pipe.unet, UNet2DConditionModel):
        raise TeacherError(f"{name!r} has a {type(pipe.unet).__name__}, not a UNet2DConditionModel")


def caption_token_ids(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """Token ids as the SD pipelines make them: padded to the tokenizer's length, truncated."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


class TextConditioner:
    """Captions -> the UNet's conditioning, as the teacher's own pipeline would compute it.

    Empty captions (caption dropout) give the unconditional branch that classifier-free guidance uses at
    inference: the encoding of "" for SD-1.x/2.x, zeros for SD-XL pipelines that force zeros for empty
    prompts (the default), so that branch is distilled too.
    """

    def __init__(self, pipe: Any, device: torch.device, dtype: torch.dtype):
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.sdxl = is_sdxl(pipe)
        self.force_zeros = self.sdxl and bool(pipe.config.get("force_zeros_for_empty_prompt", True))

    def _tokens(self, tokenizer: Any, captions: list[str]) -> torch.Tensor:
        return caption_token_ids(tokenizer, captions).to(self.device)

    @torch.no_grad()
    def __call__(self, captions: list[str], time_ids: torch.Tensor) -> dict[str, Any]:
        if not self.sdxl:
            hidden = self.pipe.text_encoder(self._tokens(self.pipe.tokenizer, captions))[0]
            return {"encoder_hidden_states": hidden.to(self.dtype)}
        states = []
        pooled = None
        for tokenizer, encoder in (
            (self.pipe.tokenizer, self.pipe.text_encoder),
            (self.pipe.tokenizer_2, self.pipe.text_encoder_2),
        ):
            output = encoder(self._tokens(tokenizer, captions), output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled = output[0]  # the projected pooled embedding of the last encoder
        hidden = torch.cat(states, dim=-1)
        if self.force_zeros:
            empty = torch.tensor([not c for c in captions], device=self.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return {
            "encoder_hidden_states": hidden.to(self.dtype),
            "added_cond_kwargs": {
                "text_embeds": pooled.to(self.dtype),
                "time_ids": time_ids.to(self.device, self.dtype),
            },
        }


class T5Conditioner:
    """Captions -> a PixArt transformer's conditioning, as its pipeline computes it without caption cleaning.

    Captions are lower-cased and stripped (the pipeline's ``clean_caption=False``), truncated at the
    pipeline's ``max_sequence_length``, and encoded by T5 with their attention mask, which also goes to the
    transformer's cross-attention (``encoder_attention_mask``). Tokens are padded only to the batch's longest
    caption, not to 120 (Alpha) or 300 (Sigma): padded tokens are masked out of T5 and out of every
    cross-attention, so the transformer's output is the same (tests check it) at a fraction of the cost.
    Empty captions (caption dropout) encode "", the pipeline's negative prompt. PixArt-Alpha at 1024 px
    (``use_additional_conditions``) also gets its resolution (height, width in pixels) and aspect-ratio
    (height / width) conditions.
    """

    def __init__(self, pipe: Any, device: torch.device, dtype: torch.dtype):
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.max_length = max_sequence_length(pipe)
        # Alpha's pipeline passes them at sample size 128; the transformer reads them only when it uses them.
        self.size_conditions = bool(getattr(pipe.transformer, "use_additional_conditions", False))

    @torch.no_grad()
    def __call__(self, captions: list[str], time_ids: torch.Tensor) -> dict[str, Any]:
        tokens = self.pipe.tokenizer(
            [caption.lower().strip() for caption in captions],
            padding="longest",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        hidden = self.pipe.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if self.size_conditions:
            height_width = time_ids[:, 4:6].to(self.device, torch.float32)  # the target (crop) size
            added = {
                "resolution": height_width.to(self.dtype),
                "aspect_ratio": (height_width[:, :1] / height_width[:, 1:]).to(self.dtype),
            }
        return {"encoder_hidden_states": hidden.to(self.dtype), "encoder_attention_mask": mask,
                "added_cond_kwargs": added}  # fmt: skip


def text_conditioner(pipe: Any, device: torch.device, dtype: torch.dtype) -> TextConditioner | T5Conditioner:
    """The caption encoder that fits the teacher: CLIP for Stable Diffusion, T5 for PixArt."""
    return T5Conditioner(pipe, device, dtype) if is_dit(pipe) else TextConditioner(pipe, device, dtype)


def predict(
    denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, condition: dict[str, Any]
) -> torch.Tensor:
    """The denoiser's epsilon (or v) prediction, as the pipelines use it.

    A PixArt transformer that also learns the variance (``out_channels`` = 2 x latent channels) returns both;
    the pipeline keeps the first half, and so do the losses.
    """
    if not is_dit(denoiser):
        return denoiser(noisy, timesteps, **condition).sample
    output = denoiser(noisy, timestep=timesteps, **condition).sample
    if denoiser.config.out_channels // 2 == noisy.shape[1]:
        output = output.chunk(2, dim=1)[0]
    return output


def frozen(module: nn.Module | None, device: torch.device, dtype: torch.dtype) -> None:
    """Freeze a teacher component and place it; dtype is passed only when it changes (diffusers warns)."""
    if module is None:
        return
    module.requires_grad_(False).eval().to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
