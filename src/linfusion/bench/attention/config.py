"""What ``linfusion bench attention`` runs: head layouts, dtypes, modes, the config and its command line."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..harness import BenchmarkInputError

# Head layouts by head dim: SD-1.5 attention blocks have 8 heads at 320/640/1280 channels; SD-XL uses
# 64-dim heads (10 heads at 640 channels, 20 at 1280).
LAYOUTS: dict[int, tuple[str, int]] = {
    40: ("SD-1.5 320ch", 8),
    80: ("SD-1.5 640ch", 8),
    160: ("SD-1.5 1280ch", 8),
    64: ("SD-XL 640ch", 10),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODES = ("forward", "forward+backward")
# Where an SDPA call is predicted to take longer than this, its warm-up runs at a quarter of the
# sequence length instead (same kernels, a sixteenth of the time).
SLOW_WARMUP_SECONDS = 5.0


@dataclass
class BenchConfig:
    """What to run; the defaults are the full CPU run (about ten minutes on 2 cores)."""

    tokens: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 65536, 262144, 1048576])
    wide_max_tokens: int = 65536
    head_dims: list[int] = field(default_factory=lambda: [40, 80, 160, 64])
    heads: int | None = None
    batch: int = 1
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    backends: list[str] = field(default_factory=lambda: ["chunked", "reference"])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    repeats: int = 5
    warmup: int = 1
    sdpa: bool = True
    sdpa_cap_seconds: float = 100.0
    sdpa_budget_seconds: float = 400.0
    sdpa_memory_cap_seconds: float = 10.0
    reference_max_tokens: int = 65536
    accuracy_dtypes: list[str] = field(default_factory=lambda: ["float16", "bfloat16"])
    accuracy_tokens: int | None = None
    memory: bool = True
    device: str = "auto"
    threads: int | None = None
    seed: int = 0


def _csv(text: str, cast: Callable[[str], Any] = str, option: str = "") -> list[Any]:
    try:
        return [cast(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise BenchmarkInputError(
            f"{option} {text!r}: expected comma-separated whole numbers such as 1024,4096"
        ) from error


def check_config(cfg: BenchConfig) -> None:
    """Refuse, before anything runs, lists and counts that cannot be benchmarked (:class:`BenchmarkInputError`)."""
    from ...ops import BACKENDS

    for option, values in (("--tokens", cfg.tokens), ("--head-dims", cfg.head_dims)):
        if not values or min(values) < 1:
            raise BenchmarkInputError(f"{option} needs whole numbers >= 1; got {values}")
    counts = {
        "--wide-max-tokens": cfg.wide_max_tokens,
        "--reference-max-tokens": cfg.reference_max_tokens,
        "--batch": cfg.batch,
        "--repeats": cfg.repeats,
        "--heads": cfg.heads,
        "--accuracy-tokens": cfg.accuracy_tokens,
        "--threads": cfg.threads,
    }
    for option, value in counts.items():
        if value is not None and value < 1:
            raise BenchmarkInputError(f"{option} must be >= 1; got {value}")
    if cfg.warmup < 0:
        raise BenchmarkInputError(f"--warmup must be >= 0; got {cfg.warmup}")
    unknown = [name for name in cfg.backends if name not in BACKENDS]
    if unknown:
        raise BenchmarkInputError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Translate parsed CLI options (see :mod:`linfusion.cli.bench`) into a config."""
    return BenchConfig(
        tokens=_csv(args.tokens, int, "--tokens"),
        wide_max_tokens=args.wide_max_tokens,
        head_dims=_csv(args.head_dims, int, "--head-dims"),
        heads=args.heads,
        batch=args.batch,
        dtypes=_csv(args.dtypes),
        backends=_csv(args.backends),
        modes=_csv(args.modes),
        repeats=args.repeats,
        warmup=args.warmup,
        sdpa=not args.no_sdpa,
        sdpa_cap_seconds=args.sdpa_cap_seconds,
        sdpa_budget_seconds=args.sdpa_budget_seconds,
        sdpa_memory_cap_seconds=args.sdpa_memory_cap_seconds,
        reference_max_tokens=args.reference_max_tokens,
        accuracy_dtypes=_csv(args.accuracy_dtypes),
        accuracy_tokens=args.accuracy_tokens,
        memory=not args.no_memory,
        device=args.device,
        threads=args.threads,
        seed=args.seed,
    )


def head_layout(head_dim: int, heads: int | None) -> tuple[str, int]:
    name, default_heads = LAYOUTS.get(head_dim, (f"{head_dim}-dim heads", 8))
    return name, heads or default_heads


def effective_command(args: argparse.Namespace) -> str:
    """The run as an explicit ``linfusion bench attention`` command line, every option spelled out."""
    parts = ["linfusion", "bench", "attention"]
    for name, value in sorted(vars(args).items()):
        if name in ("func", "command", "bench_command") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)
