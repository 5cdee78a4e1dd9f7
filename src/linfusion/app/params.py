"""Generation parameters: one immutable value that determines the image, and its PNG text form.

The PNG carries every setting in a text chunk named ``parameters`` in the format the common SD web UIs
write (prompt, ``Negative prompt: ...``, then ``Key: value`` pairs), so ``linfusion generate --from-png``
(or any of those UIs) can make the same image again. Resolving defaults returns a new value
(:meth:`GenerationParams.replace`); nothing changes a value in place.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

from ..choices import DTYPE_NAMES, GENERATION_MODES, SCHEDULERS, VAE_ATTENTION_MODES


class GenerationError(ValueError):
    """The request cannot be generated; the message says what to change."""


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
    vae_attention: str = "exact"  # "exact" (the VAE's softmax) or "linear" (linfusion.vae_attention)

    def replace(self, **changes: Any) -> GenerationParams:
        """A copy with ``changes`` applied (the value itself never changes)."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise :class:`GenerationError` naming the first setting that cannot work."""
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
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise GenerationError(f"unknown dtype {self.dtype!r}; choose auto, {', '.join(DTYPE_NAMES)}")
        if self.mode not in GENERATION_MODES:
            raise GenerationError(f"unknown mode {self.mode!r}; choose one of {', '.join(GENERATION_MODES)}")
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
            raise GenerationError(f"cannot read the parameters text ({error}): {settings_line!r}") from error
        if params.get("scheduler") not in SCHEDULERS:
            params["scheduler"] = None  # the model's own scheduler, which is what made the image
        if params.get("model") == "None":
            params["model"] = None
        return cls(**params)


def read_png_parameters(path: str | os.PathLike) -> GenerationParams:
    """The parameters recorded in a PNG written by ``linfusion generate`` (or a SD web UI)."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get("parameters")
    if not text:
        raise GenerationError(
            f"{path} has no 'parameters' text chunk (was it written by linfusion generate?)"
        )
    return GenerationParams.from_text(text)


__all__ = [
    "GenerationError",
    "GenerationParams",
    "read_png_parameters",
]
