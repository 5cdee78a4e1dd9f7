"""Resuming a distillation run: which checkpoint, whether its settings match, and its files read up front.

Everything here runs before the teacher is loaded and before anything is written, so a wrong ``--resume``
(no checkpoint there, changed settings, a corrupt file) is refused with the run's folder untouched.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .config import RUN_MARKER, DistillConfig, DistillConfigError
from .teacher import resolve_teacher

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "state.json"  # written last into a checkpoint: its presence marks the checkpoint complete

# Settings that change what the weights are: a checkpoint made with other values cannot be continued.
ARCHITECTURE_SETTINGS = ("teacher", "projection_mid_dim")
# Settings that only say how the run is driven or recorded: they may change on every resume.
FREE_SETTINGS = (
    "output", "resume", "overwrite", "allow_config_change", "checkpoint_every", "checkpoints_total_limit",
    "validate_every", "validation_prompts", "validation_steps", "validation_guidance", "num_workers",
    "report_to", "gradient_checkpointing",
)  # fmt: skip
# Learning-rate schedules that do not depend on the total number of steps (max_steps may then change).
STEP_COUNT_FREE_SCHEDULERS = ("constant", "constant_with_warmup")


class CheckpointError(UserError, ValueError):
    """A checkpoint to resume from is missing, corrupt or made with other settings; the message says why."""


@dataclass
class Checkpoint:
    """A checkpoint's files, read and checked before training starts."""

    path: Path
    state: dict[str, Any]
    linfusion: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any] | None


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint folder's name (``step-000500`` -> 500)."""
    return int(path.name.removeprefix(CHECKPOINT_PREFIX))


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The run's complete checkpoints (those holding ``state.json``), oldest first."""
    found = [
        path
        for path in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if path.name.removeprefix(CHECKPOINT_PREFIX).isdigit() and (path / STATE_FILE).exists()
    ]
    return sorted(found, key=checkpoint_step)


def find_checkpoint(config: DistillConfig) -> Path | None:
    """The checkpoint ``--resume`` names: ``latest`` (highest complete step, None when there is none) or a path."""
    if config.resume in (None, ""):
        return None
    if config.resume != "latest":
        path = Path(config.resume)
        if not (path / STATE_FILE).exists():
            raise CheckpointError(
                f"--resume {config.resume!r}: no checkpoint there ({STATE_FILE} missing); pass a checkpoint "
                f"folder such as {config.checkpoint_dir / (CHECKPOINT_PREFIX + '000500')}, or latest"
            )
        return path
    if not config.checkpoint_dir.is_dir():
        return None
    complete = complete_checkpoints(config.checkpoint_dir)
    return complete[-1] if complete else None


def _what_to_do(path: Path) -> str:
    """Delete the bad checkpoint; resume from the one before it, if any."""
    if path.name.startswith(CHECKPOINT_PREFIX) and path.name.removeprefix(CHECKPOINT_PREFIX).isdigit():
        earlier = [p for p in complete_checkpoints(path.parent) if checkpoint_step(p) < checkpoint_step(path)]
        alternative = (
            f"resume from an earlier one (--resume {earlier[-1]})"
            if earlier
            else "start again (--overwrite instead of --resume)"
        )
    else:
        alternative = "resume from another checkpoint"
    return f"delete the checkpoint folder {path} and {alternative}"


def _corrupt(path: Path, file: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot resume: the checkpoint file {file} is corrupt or unreadable ({type(error).__name__}: {error}); "
        f"{_what_to_do(path)}"
    )


# What torch.load and friends raise for a truncated, foreign or corrupt file.
LOAD_ERRORS = (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError, KeyError, AttributeError)


def _torch_file(path: Path, name: str, required: bool = True) -> Any:
    file = path / name
    if not file.exists():
        if not required:
            return None
        raise CheckpointError(f"cannot resume: the checkpoint {path} has no {name}; {_what_to_do(path)}")
    try:
        return torch.load(file, weights_only=False)
    except LOAD_ERRORS as error:
        raise _corrupt(path, file, error) from error


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``, refused clearly when it is not the JSON a run writes."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        for key in ("step", "epoch", "batch_in_epoch", "skipped_images", "num_processes"):
            if not isinstance(state[key], int) or state[key] < 0:
                raise TypeError(f"{key} is {state[key]!r}, not a count")
        if not isinstance(state["config"], dict):
            raise TypeError("config is not a JSON object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise _corrupt(path, file, error) from error
    return state


def _same_place(name: str, recorded: Any, given: Any) -> bool:
    """Whether two ``--teacher`` (``bundled`` included) or ``--data`` values name the same existing folder."""
    if not isinstance(recorded, str) or not isinstance(given, str):
        return False
    resolve = resolve_teacher if name == "teacher" else str
    first, second = Path(resolve(recorded)), Path(resolve(given))
    return first.exists() and second.exists() and first.resolve() == second.resolve()


def config_changes(saved: dict[str, Any], config: DistillConfig) -> tuple[list[str], list[str]]:
    """``(refused, needs_flag)``: the differences between a checkpoint's settings and ``config``, in words.

    Architecture settings may never change; settings that change the training (learning rate, batch size,
    data, ...) only with ``allow_config_change``; bookkeeping settings freely. ``max_steps`` is free when
    the learning-rate schedule does not depend on it.
    """
    current = json.loads(config.to_json())
    free = set(FREE_SETTINGS)
    if config.lr_scheduler in STEP_COUNT_FREE_SCHEDULERS and saved.get("lr_scheduler") == config.lr_scheduler:
        free.add("max_steps")
    refused, needs_flag = [], []
    for setting in fields(config):
        name = setting.name
        if name in free or name not in saved or saved[name] == current[name]:
            continue
        if name in ("teacher", "data") and _same_place(name, saved[name], current[name]):
            continue  # the same folder, named from another working directory
        change = f"--{name.replace('_', '-')} {saved[name]!r} -> {current[name]!r}"
        (refused if name in ARCHITECTURE_SETTINGS else needs_flag).append(change)
    return refused, needs_flag


def check_settings(path: Path, state: dict[str, Any], config: DistillConfig) -> None:
    """Refuse to continue a checkpoint with settings it was not made with (see :func:`config_changes`)."""
    refused, needs_flag = config_changes(state["config"], config)
    if refused:
        raise DistillConfigError(
            f"cannot resume {path} with other model settings ({'; '.join(refused)}): its weights have another "
            "shape or come from another teacher. Resume with the checkpoint's values, or start a new run in "
            "another --output folder"
        )
    if needs_flag and not config.allow_config_change:
        raise DistillConfigError(
            f"resuming {path} with changed training settings ({'; '.join(needs_flag)}): resume with the "
            "checkpoint's values, or pass --allow-config-change to continue with the new ones"
        )


def checked_resume_point(config: DistillConfig) -> Path | None:
    """The checkpoint to resume from, its settings compared with ``config``; None to start at step 0.

    Without a checkpoint yet, a resumed run is compared with the settings its folder records
    (``distill_config.json``), so that ``--resume`` never silently replaces them.
    """
    path = find_checkpoint(config)
    if path is not None:
        check_settings(path, read_state(path), config)
        return path
    recorded = config.output_dir / RUN_MARKER
    if config.resume and recorded.is_file():
        try:
            saved = json.loads(recorded.read_text(encoding="utf-8"))
            if not isinstance(saved, dict):
                raise TypeError(f"expected a JSON object, found {type(saved).__name__}")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as error:
            raise CheckpointError(
                f"cannot resume: {recorded} is corrupt or unreadable ({type(error).__name__}: {error}); pass "
                "--overwrite instead of --resume to start the run again"
            ) from error
        check_settings(config.output_dir, {"config": saved}, config)
    return None


def load_checkpoint_files(path: Path, config: DistillConfig, rank: int) -> Checkpoint:
    """Read and check every file of checkpoint ``path`` for process ``rank``: settings first, then weights."""
    from ..model import LinFusion

    state = read_state(path)
    check_settings(path, state, config)
    weights = path / "linfusion"
    try:
        linfusion = LinFusion.from_pretrained(weights).state_dict()
    except UserError as error:
        raise CheckpointError(f"cannot resume: {error}; {_what_to_do(path)}") from error
    except LOAD_ERRORS as error:
        raise _corrupt(path, weights, error) from error
    return Checkpoint(
        path=path,
        state=state,
        linfusion=linfusion,
        optimizer=_torch_file(path, "optimizer.pt"),
        lr_scheduler=_torch_file(path, "lr_scheduler.pt"),
        scaler=_torch_file(path, "scaler.pt", required=False),
        rng=_torch_file(path, f"rng-{rank}.pt", required=False),
    )
