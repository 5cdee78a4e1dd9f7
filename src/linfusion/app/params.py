"""Generation parameters: one immutable value that determines the image, and its PNG text form.

The PNG carries every setting in a text chunk named ``parameters`` in the format the common SD web UIs
write (prompt, ``Negative prompt: ...``, then ``Key: value`` pairs), so ``linfusion generate --from-png``
(or any of those UIs) can make the same image again. Resolving defaults returns a new value
(:meth:`GenerationParams.replace`); nothing changes a value in place.

:meth:`GenerationParams.validate` is the one check of what a user typed (the command line, the Python API
and the web UI give the same messages); it imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..choices import (
    DTYPE_NAMES,
    GENERATION_MODES,
    MAX_STEPS,
    SCHEDULERS,
    SIZE_MULTIPLE,
    VAE_ATTENTION_CHOICES,
)
from ..errors import UserError, excerpt

RANDOM_SEED = -1  # --seed -1: draw one (the SD web UIs' convention); the PNG records the one drawn
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds below this


class GenerationError(UserError, ValueError):
    """The request cannot be generated; the message says what to change."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
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
    mode: str = "plain"  # "plain": one pass at the size; "sdedit"/"demofusion": native size, then stages
    vae_attention: str = "auto"  # "exact" (the VAE's softmax), "linear" (linfusion.vae_attention), "auto"

    def replace(self, **changes: Any) -> GenerationParams:
        """A copy with ``changes`` applied (the value itself never changes)."""
        return dataclasses.replace(self, **changes)

    def with_seed(self) -> GenerationParams:
        """This value with a concrete seed: a random one drawn for ``seed=-1``, else itself."""
        if self.seed != RANDOM_SEED:
            return self
        return self.replace(seed=secrets.randbelow(2**32))

    def validate(self, minimum_side: int | None = None) -> None:
        """Raise :class:`GenerationError` naming the first setting that cannot work.

        ``minimum_side``: the smallest width and height the loaded model works at (see
        :func:`minimum_side_message`); known once the model is loaded, so checked again then.
        """
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise GenerationError(
                    f"{name} must be text (one str); got {type(getattr(self, name)).__name__} "
                    f"{excerpt(getattr(self, name))}"
                )
        for name in ("linfusion", "dtype", "mode", "vae_attention", "model", "scheduler"):
            value = getattr(self, name)
            if not isinstance(value, str) and not (value is None and name in ("model", "scheduler")):
                hint = ' ("none": without LinFusion)' if name == "linfusion" else ""
                raise GenerationError(f"{name} must be text{hint}; got {excerpt(value)}")
        if not self.prompt or not self.prompt.strip():
            raise GenerationError(
                'the prompt is empty: say what to draw, e.g. linfusion generate "a red circle"'
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_whole(value) or value <= 0 or value % SIZE_MULTIPLE:
                nearest = (
                    max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)
                    if _is_number(value) and math.isfinite(value) and value > 0
                    else 512
                )
                what = "a positive multiple" if _is_whole(value) else "a whole number and a multiple"
                raise GenerationError(
                    f"{name} {value!r} is not {what} of {SIZE_MULTIPLE} (the VAE works in blocks of "
                    f"{SIZE_MULTIPLE} pixels); try {nearest}"
                )
            if minimum_side is not None and value < minimum_side:
                raise GenerationError(minimum_side_message(f"{name} {value}", minimum_side))
        if not _is_whole(self.steps) or self.steps < 1:
            raise GenerationError(f"--steps must be a whole number >= 1; got {self.steps}")
        if self.steps > MAX_STEPS:
            raise GenerationError(
                f"--steps {self.steps}: at most {MAX_STEPS} (a sampler cannot take as many steps as the "
                "model's training schedule)"
            )
        if not _is_number(self.guidance) or not math.isfinite(self.guidance) or self.guidance < 0:
            raise GenerationError(
                f"--guidance must be a finite number >= 0 (1 or less means no guidance; 7.5 is usual); "
                f"got {self.guidance}"
            )
        if not _is_whole(self.seed) or not RANDOM_SEED <= self.seed < SEED_LIMIT:
            raise GenerationError(
                f"--seed must be a whole number from 0 to 2**64-1, or -1 for a random one; got {self.seed}"
            )
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise GenerationError(
                f"unknown scheduler {excerpt(self.scheduler)}; choose one of {', '.join(SCHEDULERS)}"
            )
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise GenerationError(
                f"unknown dtype {excerpt(self.dtype)}; choose auto, {', '.join(DTYPE_NAMES)}"
            )
        if self.mode not in GENERATION_MODES:
            raise GenerationError(
                f"unknown mode {excerpt(self.mode)}; choose one of {', '.join(GENERATION_MODES)}"
            )
        if self.vae_attention not in VAE_ATTENTION_CHOICES:
            raise GenerationError(
                f"unknown VAE attention {excerpt(self.vae_attention)}; choose one of {', '.join(VAE_ATTENTION_CHOICES)}"
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

    def to_text(self, extra: Mapping[str, str] | None = None) -> str:
        """``parameters`` text: prompt, negative prompt, then ``Key: value`` pairs (web-UI convention).

        ``extra``: more pairs after the settings (an upscale's source and scale), which :meth:`from_text`
        and other readers pass over.
        """
        pairs = [f"{label}: {getattr(self, name)}" for name, label in self._KEYS.items() if name != "model"]
        pairs.insert(3, f"Size: {self.width}x{self.height}")
        pairs.append(f"Model: {self.model}")
        pairs += [f"{key}: {value}" for key, value in (extra or {}).items()]
        text = self.prompt
        if self.negative_prompt:
            text += f"\nNegative prompt: {self.negative_prompt}"
        return text + "\n" + ", ".join(pairs)

    @classmethod
    def from_text(cls, text: str) -> GenerationParams:
        """The parameters a ``parameters`` chunk records; raises :class:`GenerationError` when unreadable."""
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
        try:
            for label, raw in values.items():
                if label == "Size":
                    width, height = raw.split("x")
                    params["width"], params["height"] = int(width), int(height)
                elif label in labels:
                    name = labels[label]
                    params[name] = convert.get(name, str)(raw)
        except ValueError as error:
            raise GenerationError(
                f"cannot read the parameters text ({excerpt(str(error))}): {excerpt(settings_line)}"
            ) from error
        if params.get("scheduler") not in SCHEDULERS:
            params["scheduler"] = None  # the model's own scheduler, which is what made the image
        if params.get("model") == "None":
            params["model"] = None
        return cls(**params)


def minimum_side_message(what: str, minimum_side: int) -> str:
    """Why ``what`` (e.g. "width 16", "the image 1x1") is too small for a model, and what to use instead."""
    return (
        f"{what} is too small for this model: its UNet halves the latent image at each level and needs at "
        f"least one row and column at the deepest one, so width and height must be at least {minimum_side} "
        f"pixels; use {minimum_side} or more"
    )


def png_parameters_text(path: str | os.PathLike) -> str:
    """The ``parameters`` text chunk of the PNG at ``path``, read from its header (any size, no pixels decoded)."""
    from ..images import ImageError, read_png_text

    try:
        text = read_png_text(path, "parameters")
    except ImageError as error:
        raise GenerationError(f"{error}; pass a PNG written by linfusion generate or a SD web UI") from error
    if not text:
        raise GenerationError(
            f"{path} has no 'parameters' text chunk (was it written by linfusion generate?)"
        )
    return text


def read_png_parameters(path: str | os.PathLike) -> GenerationParams:
    """The parameters recorded in a PNG written by ``linfusion generate`` (or a SD web UI)."""
    return GenerationParams.from_text(png_parameters_text(path))


def recorded_prompts(path: str | os.PathLike) -> tuple[str, str] | None:
    """(prompt, negative prompt) recorded in a PNG written by ``linfusion generate`` (or a SD web UI), or
    None when the file records none (another image, an unreadable text): what enlarging it should ask for."""
    try:
        recorded = read_png_parameters(path)
    except GenerationError:
        return None
    return (recorded.prompt, recorded.negative_prompt) if recorded.prompt else None


def ignored_settings(text: str) -> list[str]:
    """Notes on what a ``parameters`` text records that a replay cannot use (an unknown sampler)."""
    sampler = re.search(r"(?:^|, )Sampler: ((?:(?!, [A-Za-z ]+: ).)*)", text.strip().split("\n")[-1])
    if sampler and sampler.group(1) not in SCHEDULERS and sampler.group(1) != "None":
        return [
            f"note: the PNG's sampler {excerpt(sampler.group(1))} is not one of {', '.join(SCHEDULERS)}: "
            "the model's own scheduler runs instead, so the image may differ"
        ]
    return []


__all__ = [
    "RANDOM_SEED",
    "GenerationError",
    "GenerationParams",
    "ignored_settings",
    "minimum_side_message",
    "png_parameters_text",
    "read_png_parameters",
]
