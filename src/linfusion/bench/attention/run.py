"""The benchmark run: which cases, in which order, SDPA within its time budget; the command's entry point."""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...ops import linear_attention_reference
from ..harness import BenchmarkInputError, environment, loadavg, wait_for_idle
from .accuracy import half_precision_accuracy, sdpa_agreement
from .config import (
    DTYPES,
    MODES,
    SLOW_WARMUP_SECONDS,
    BenchConfig,
    check_config,
    config_from_args,
    effective_command,
    head_layout,
)
from .memory import measure_memory
from .report import write_outputs
from .targets import evaluate_targets
from .timing import (
    arithmetic_callable,
    attention_op,
    case_callable,
    floor_callable,
    make_qkv,
    relative_error,
    resolve_device,
    time_calls,
)


class SdpaPlanner:
    """Decides whether an SDPA case runs: per-call cap and a run-wide budget of predicted seconds."""

    def __init__(self, cap: float, budget: float):
        self.cap, self.budget = cap, budget
        self.measured: dict[tuple, list[tuple[int, float]]] = {}

    def predict(self, key: tuple, tokens: int) -> float | None:
        smaller = [(n, t) for n, t in self.measured.get(key, []) if n < tokens]
        if not smaller:
            return None
        n0, t0 = max(smaller)
        return t0 * (tokens / n0) ** 2

    def decide(self, key: tuple, tokens: int, repeats: int, warmup: int) -> tuple[bool, float | None, str]:
        predicted = self.predict(key, tokens)
        if predicted is None:
            if tokens > 4096:
                return False, None, "no smaller measurement to predict the time from"
            return True, None, ""
        if predicted > self.cap:
            return False, predicted, f"predicted {predicted:.0f} s per call > cap {self.cap:.0f} s"
        # slow cases warm up at a quarter of the length (a sixteenth of the time), see SLOW_WARMUP_SECONDS
        warm = predicted / 16 if predicted > SLOW_WARMUP_SECONDS else predicted
        total = predicted * repeats + warm * warmup
        if total > self.budget:
            return (
                False,
                predicted,
                f"predicted {total:.0f} s for this case > remaining SDPA budget {self.budget:.0f} s",
            )
        return True, predicted, ""

    def record(self, key: tuple, tokens: int, seconds: float, spent: float) -> None:
        self.measured.setdefault(key, []).append((tokens, seconds))
        self.budget -= spent


def run_order(cfg: BenchConfig) -> list[tuple[str, int, int, str, int]]:
    """(mode, head_dim, heads, dtype, tokens) in run order.

    The headline series (first mode, first head dim, first dtype) runs first and in full, so the SDPA
    budget is spent on it before anything else; every other case follows, smallest first, so that the
    remaining budget buys SDPA baselines for as many layouts as possible.
    """
    out = []
    for mode in cfg.modes:
        for head_dim in cfg.head_dims:
            _, heads = head_layout(head_dim, cfg.heads)
            limit = max(cfg.tokens) if head_dim == cfg.head_dims[0] else cfg.wide_max_tokens
            for dtype in cfg.dtypes:
                for tokens in sorted(cfg.tokens):
                    if tokens <= limit:
                        out.append((mode, head_dim, heads, dtype, tokens))
    first = (cfg.modes[0], cfg.head_dims[0], cfg.dtypes[0])
    headline = [c for c in out if (c[0], c[1], c[3]) == first]
    rest = sorted(
        (c for c in out if (c[0], c[1], c[3]) != first),
        key=lambda c: (c[4], cfg.modes.index(c[0]), cfg.head_dims.index(c[1]), cfg.dtypes.index(c[3])),
    )
    return headline + rest


def run_benchmark(
    cfg: BenchConfig, log: Callable[[str], None] = print, command: str | None = None
) -> dict[str, Any]:
    """Run everything in ``cfg`` and return the result dictionary (also the JSON written to disk)."""
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    backends = list(cfg.backends)
    if device.type == "cuda" and "triton" not in backends:
        from ...ops import available_backends

        probe = torch.empty(1, device=device)
        if "triton" in available_backends(probe):
            backends.append("triton")
    result: dict[str, Any] = {
        "environment": environment(device, torch.get_num_threads(), command),
        "config": asdict(cfg),
        "backends": backends,
        "cases": [],
        "skipped": [],
    }
    planner = SdpaPlanner(cfg.sdpa_cap_seconds, cfg.sdpa_budget_seconds)
    memory_cases: list[dict[str, Any]] = []
    for mode, head_dim, heads, dtype_name, tokens in run_order(cfg):
        dtype = DTYPES[dtype_name]
        layout_name, _ = head_layout(head_dim, heads)
        q, k, v = make_qkv(cfg.batch, heads, tokens, head_dim, dtype, device, cfg.seed)
        base = {
            "mode": mode,
            "layout": layout_name,
            "batch": cfg.batch,
            "heads": heads,
            "head_dim": head_dim,
            "dtype": dtype_name,
            "tokens": tokens,
            "qkv_bytes": 3 * q.numel() * q.element_size(),
        }
        floors = {}
        for label, fresh in (("floor_fresh", True), ("floor_prealloc", False)):
            times = time_calls(floor_callable(mode, q, k, v, fresh), cfg.repeats, cfg.warmup, device, None)
            floors[label] = statistics.median(times)
        if mode == "forward" and device.type == "cpu":
            arithmetic = time_calls(arithmetic_callable(q, k, v), cfg.repeats, cfg.warmup, device, None)
            floors["arithmetic"] = statistics.median(arithmetic)
        reference_out = None
        if tokens <= cfg.reference_max_tokens and mode == "forward":
            with torch.no_grad():
                reference_out = linear_attention_reference(q, k, v)
        for backend in [*backends, "sdpa"] if cfg.sdpa else backends:
            entry = {**base, "backend": backend}
            if backend == "reference" and tokens > cfg.reference_max_tokens:
                result["skipped"].append(
                    {**entry, "reason": f"reference above {cfg.reference_max_tokens} tokens"}
                )
                continue
            warm_fn = None
            key: tuple = ()
            if backend == "sdpa":
                key = (mode, head_dim, heads, dtype_name)
                run, predicted, reason = planner.decide(key, tokens, cfg.repeats, cfg.warmup)
                if not run:
                    result["skipped"].append({**entry, "reason": "SDPA " + reason})
                    log(f"skip  {mode:16s} d={head_dim:<3d} {dtype_name:8s} N={tokens:<8d} sdpa: {reason}")
                    continue
                if predicted is not None and predicted > SLOW_WARMUP_SECONDS:
                    small = [t[:, :, : max(1, tokens // 4)].contiguous() for t in (q, k, v)]
                    warm_fn = case_callable(backend, mode, *small)
                    entry["warmup_tokens"] = small[0].shape[2]
                entry["sdpa_predicted_seconds"] = predicted
            fn = case_callable(backend, mode, q, k, v)
            started = time.perf_counter()
            try:
                times = time_calls(fn, cfg.repeats, cfg.warmup, device, warm_fn)
            except (RuntimeError, MemoryError) as error:
                result["skipped"].append({**entry, "reason": f"{type(error).__name__}: {error}"[:300]})
                continue
            spent = time.perf_counter() - started
            median = statistics.median(times)
            if backend == "sdpa":
                planner.record(key, tokens, median, spent)
            entry.update(
                {
                    "times_s": times,
                    "median_s": median,
                    "floor_fresh_s": floors["floor_fresh"],
                    "floor_prealloc_s": floors["floor_prealloc"],
                    "over_floor_fresh": median / floors["floor_fresh"],
                    "over_floor_prealloc": median / floors["floor_prealloc"],
                }
            )
            if "arithmetic" in floors:
                entry["arithmetic_floor_s"] = floors["arithmetic"]
            if reference_out is not None and backend not in ("sdpa",):
                with torch.no_grad():
                    entry["max_rel_err_vs_reference"] = relative_error(
                        attention_op(backend)(q, k, v), reference_out
                    )
            result["cases"].append(entry)
            log(
                f"time  {mode:16s} d={head_dim:<3d} {dtype_name:8s} N={tokens:<8d} {backend:9s} "
                f"{median * 1e3:10.2f} ms  (floor {floors['floor_fresh'] * 1e3:.2f} ms)"
            )
            if cfg.memory and (backend != "sdpa" or median <= cfg.sdpa_memory_cap_seconds):
                memory_cases.append(
                    {
                        "mode": mode,
                        "backend": backend,
                        "batch": cfg.batch,
                        "heads": heads,
                        "head_dim": head_dim,
                        "dtype": dtype_name,
                        "tokens": tokens,
                        "seed": cfg.seed,
                    }
                )
        del q, k, v, reference_out
        gc.collect()
    _attach_speedups(result["cases"])
    if cfg.memory:
        log(f"memory: {len(memory_cases)} cases in a child process")
        measured = measure_memory(memory_cases, device, cfg.threads)
        _attach_memory(result["cases"], measured)
    if cfg.accuracy_dtypes:
        head_dim = cfg.head_dims[0]
        _, heads = head_layout(head_dim, cfg.heads)
        tokens = cfg.accuracy_tokens or max(cfg.tokens)
        log(f"accuracy: {cfg.accuracy_dtypes} at {tokens} tokens")
        result["half_precision"] = half_precision_accuracy(
            tokens, head_dim, heads, cfg.batch, cfg.accuracy_dtypes, device, cfg.seed
        )
    result["sdpa_agreement"] = sdpa_agreement(device, cfg.seed)
    result["environment"]["loadavg_end"] = loadavg()
    result["targets"] = evaluate_targets(result)
    return result


def _key(entry: dict[str, Any]) -> tuple:
    return (entry["mode"], entry["head_dim"], entry["heads"], entry["dtype"], entry["tokens"])


def _attach_speedups(cases: list[dict[str, Any]]) -> None:
    sdpa = {_key(c): c["median_s"] for c in cases if c["backend"] == "sdpa"}
    for case in cases:
        if case["backend"] != "sdpa" and _key(case) in sdpa:
            case["speedup_vs_sdpa"] = sdpa[_key(case)] / case["median_s"]


def _attach_memory(cases: list[dict[str, Any]], measured: list[dict[str, Any]]) -> None:
    by_key = {(*_key(m), m["backend"]): m for m in measured}
    for case in cases:
        m = by_key.get((*_key(case), case["backend"]))
        if m is None:
            continue
        for name in (
            "tensor_peak_bytes",
            "tensor_peak_over_qkv",
            "rss_peak_bytes",
            "rss_peak_over_qkv",
            "malloc_limited",
            "error",
        ):
            if name in m:
                case["memory_" + name if name == "error" else name] = m[name]


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``linfusion bench attention``."""
    cfg = config_from_args(args)
    check_config(cfg)
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle, args.idle_load)
    unknown = [d for d in cfg.dtypes + cfg.accuracy_dtypes if d not in DTYPES]
    if unknown:
        raise BenchmarkInputError(f"unknown dtype(s) {unknown}; choose from {list(DTYPES)}")
    bad_modes = [m for m in cfg.modes if m not in MODES]
    if bad_modes:
        raise BenchmarkInputError(f"unknown mode(s) {bad_modes}; choose from {list(MODES)}")
    result = run_benchmark(cfg, log=lambda line: print(line, flush=True), command=effective_command(args))
    paths = write_outputs(result, Path(args.out), args.tag, plot=not args.no_plot)
    for name, t in result["targets"].items():
        print(f"target {name}: {t['value']} (target {t['target']}, met: {t['met']})")
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0
