"""Atomic, resumable training state and append-only JSONL logs.

Training of the bundled model runs in the background across sessions that may be killed at any
moment, so a checkpoint must never be half written (temp file + rename) and a resumed run must
continue the exact same stream: the step, optimizer, EMA and RNG states all live in one file.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linfusion.io import torch_save


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves half a file (temporary file, fsync, rename; umask permissions)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch_save(obj, path)


def load(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(generator: torch.Generator, state: dict[str, Any]) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_run(
    path: str | os.PathLike,
    stateful: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    step: int,
    **extra: Any,
) -> None:
    """Write a run's resumable state atomically: each of ``stateful``'s state dicts under its key, then
    the optimizer, the RNG states, the step and ``extra`` (what ``restore_run`` reads back)."""
    state = {key: value.state_dict() for key, value in stateful.items()}
    state.update(optimizer=optimizer.state_dict(), rng=rng_state(generator), step=step, **extra)
    atomic_save(state, path)


def restore_run(
    state: dict[str, Any],
    stateful: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> int:
    """Load a state written by ``save_run`` into ``stateful``, the optimizer and the RNGs; its step."""
    for key, value in stateful.items():
        value.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(generator, state["rng"])
    return state["step"]


class JsonlLog:
    """An append-only JSON-lines log; on resume, records after the checkpoint step are dropped."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()


def open_log(path: str | os.PathLike, resumed_at: int | None, facts: dict[str, Any]) -> JsonlLog:
    """A run's log opened with a "config" record (fresh run) or a "resume" one at step ``resumed_at``."""
    log = JsonlLog(path, resume_step=resumed_at)
    event = "config" if resumed_at is None else "resume"
    log.write({"event": event, "step": resumed_at or 0, **facts})
    return log


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL log."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
