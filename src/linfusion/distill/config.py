"""Settings of a distillation run, validated before anything heavy is loaded."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import probe_writable

MIXED_PRECISION = ("no", "fp16", "bf16")
# diffusers' get_scheduler names that need nothing more than warmup and total steps.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# accelerate's trackers (``Accelerator(log_with=...)``).
TRACKERS = (
    "all",
    "aim",
    "tensorboard",
    "wandb",
    "trackio",
    "comet_ml",
    "mlflow",
    "clearml",
    "dvclive",
    "swanlab",
)
RUN_MARKER = "distill_config.json"  # written first by every run: marks a folder as a distill run's own


class DistillConfigError(UserError, ValueError):
    """The distillation settings cannot work (values, output folder, checkpoint); the message says why."""


@dataclass
class DistillConfig:
    """Everything ``linfusion distill`` takes; defaults follow the published recipe plus our fixes
    (teacher initialization, caption dropout, aspect-preserving crops, optimizer-step counting).

    Steps are optimizer steps (one per ``grad_accum`` micro-batches), not micro-batches.
    """

    teacher: str
    data: str
    output: str
    resolution: int = 512
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_steps: int = 1000
    seed: int = 0
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 3
    resume: str | None = None
    overwrite: bool = False  # write into a non-empty --output that is not this run's own, or start over
    allow_config_change: bool = False  # resume with other training settings (lr, batch size, data, ...)
    init: str = "teacher"
    projection_mid_dim: int | str | None = "auto"
    caption_dropout: float = 0.1
    loss_weights: tuple[float, float, float] = (1.0, 0.5, 0.5)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    cache_latents: bool = False
    random_crop: bool = True
    allow_missing_captions: bool = False
    image_column: str = "image"
    caption_column: str = "text"
    validate_every: int = 0
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 25
    validation_guidance: float = 7.5
    num_workers: int = 0
    report_to: str | None = None
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        self.loss_weights = tuple(float(w) for w in self.loss_weights)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with what to change, before any model or data is loaded."""
        problems = []
        for name in ("teacher", "data", "output"):
            if not str(getattr(self, name)).strip():
                problems.append(f"--{name} is empty; name a folder (or a Hub id for --teacher and --data)")
        if self.resolution <= 0 or self.resolution % 8 != 0:
            problems.append(
                f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8); got {self.resolution}"
            )
        for name in ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "validation_steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        for name in ("seed", "num_workers", "lr_warmup_steps", "validate_every"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0; got {getattr(self, name)}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 0:
            problems.append(
                f"--checkpoints-total-limit must be >= 0 (0: keep every checkpoint); got {self.checkpoints_total_limit}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"--lr must be a number > 0; got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be a number >= 0; got {self.weight_decay}")
        if self.max_grad_norm is not None and not (
            math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0
        ):
            problems.append(f"max_grad_norm must be a number > 0 or None; got {self.max_grad_norm}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(
                f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}; got {self.lr_scheduler!r}"
            )
        if self.report_to is not None and self.report_to not in TRACKERS:
            problems.append(f"--report-to must be one of {', '.join(TRACKERS)}; got {self.report_to!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            problems.append(f"--caption-dropout must be in [0, 1); got {self.caption_dropout}")
        weights = self.loss_weights
        if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
            problems.append(
                f"--loss-weights takes three non-negative numbers noise,kd,feat; got {self.loss_weights}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(
                f"--mixed-precision must be one of {MIXED_PRECISION}; got {self.mixed_precision!r}"
            )
        if self.init not in ("teacher", "random"):
            problems.append(f"--init must be 'teacher' or 'random'; got {self.init!r}")
        if self.validate_every and not self.validation_prompts:
            problems.append("--validate-every needs --validation-prompts")
        if problems:
            raise DistillConfigError("invalid distillation settings:\n  - " + "\n  - ".join(problems))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DistillConfigError(f"unknown distillation settings: {unknown}")
        return cls(**values)

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.output_dir / "train_log.jsonl"

    def check_output(self) -> None:
        """Refuse an ``--output`` whose files this run would clobber or mix with its own.

        An absent or empty folder is fine; so is a folder of a previous ``linfusion distill`` run (it
        holds ``distill_config.json``) when resuming it; anything else needs ``overwrite``.
        """
        output = self.output_dir
        if output.exists() and not output.is_dir():
            raise DistillConfigError(f"--output {output} is a file; pass a folder (it is created if missing)")
        check_writable(output)
        if not output.exists() or not any(output.iterdir()):
            return
        if self.overwrite:
            return
        if (output / RUN_MARKER).exists():
            if self.resume:
                return
            raise DistillConfigError(
                f"--output {output} holds a linfusion distill run already: continue it with --resume, or "
                "pass --overwrite to start again there (its checkpoints and training log are replaced)"
            )
        raise DistillConfigError(
            f"--output {output} is not empty and is not a linfusion distill run (it has no {RUN_MARKER}): "
            "choose a new or empty folder, or pass --overwrite to write the run into it (files of the same "
            "names, such as config.json, would be replaced)"
        )


def check_writable(folder: Path) -> None:
    """Refuse an ``--output`` this process cannot create or write in, before any work, leaving nothing behind."""
    try:
        probe_writable(folder)
    except NotADirectoryError as error:
        raise DistillConfigError(
            f"--output {folder} cannot be created: {error.filename} is a file, not a folder; choose another --output"
        ) from error
    except OSError as error:
        place = "folder" if Path(error.filename) == folder else f"folder's parent {error.filename}"
        raise DistillConfigError(
            f"--output {folder}: cannot write in the {place} ({error.strerror or error}); choose a folder "
            "you can write to"
        ) from error
