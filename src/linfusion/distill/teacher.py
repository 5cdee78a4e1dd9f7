"""The teacher: a diffusers SD-1.x / SD-2.x / SD-XL pipeline, and how it turns captions into conditioning."""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from ..bundled.paths import MODEL_DIR
from ..choices import BUNDLED_MODEL_NAME
from ..errors import UserError
from ..hub import load_failure_message, looks_like_hub_id
from ..registry import is_sdxl

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class TeacherError(UserError, ValueError):
    """The teacher cannot be used for distillation; the message says why."""


def resolve_teacher(name_or_path: str) -> str:
    """The folder or Hub id behind ``--teacher`` ("bundled": the bundled model's folder, as for generate)."""
    return str(MODEL_DIR) if name_or_path == BUNDLED_MODEL_NAME else name_or_path


def check_teacher_source(name_or_path: str) -> None:
    """Refuse a ``--teacher`` that is neither a pipeline folder nor a Hub id, without loading anything."""
    source = resolve_teacher(name_or_path)
    if looks_like_hub_id(source):
        return
    if not os.path.exists(source):
        raise TeacherError(
            f"--teacher {name_or_path!r}: no such folder; pass a diffusers pipeline folder (with "
            f"model_index.json), a Hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5, or "
            f"{BUNDLED_MODEL_NAME}"
        )
    if not os.path.isfile(os.path.join(source, "model_index.json")):
        raise TeacherError(
            f"could not load the teacher {name_or_path!r} as a diffusers pipeline: the folder has no "
            "model_index.json. Pass a Hub id or a folder written by save_pretrained (with model_index.json)"
        )


def _without_unshown_references(message: str) -> str:
    """A library's error text minus sentences pointing at a traceback the user is not shown."""
    sentences = re.split(r"(?<=[.!?])\s+", str(message).strip())
    return " ".join(s for s in sentences if "stacktrace" not in s.lower() and "traceback" not in s.lower())


def load_teacher(name_or_path: str, dtype: torch.dtype = torch.float32) -> Any:
    """Load a Stable Diffusion pipeline (Hub id, local folder or ``bundled``) and check LinFusion can distill it."""
    from diffusers import DiffusionPipeline

    check_teacher_source(name_or_path)
    source = resolve_teacher(name_or_path)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, safety_checker=None)
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
    from diffusers import UNet2DConditionModel

    missing = [c for c in REQUIRED_COMPONENTS if getattr(pipe, c, None) is None]
    if missing:
        raise TeacherError(
            f"{name!r} is a {type(pipe).__name__}, not a Stable Diffusion pipeline: it has no {', '.join(missing)} "
            "(LinFusion distills SD-1.x, SD-2.x and SD-XL text-to-image pipelines)"
        )
    if not isinstance(pipe.unet, UNet2DConditionModel):
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


def frozen(module: nn.Module | None, device: torch.device, dtype: torch.dtype) -> None:
    """Freeze a teacher component and place it; dtype is passed only when it changes (diffusers warns)."""
    if module is None:
        return
    module.requires_grad_(False).eval().to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
