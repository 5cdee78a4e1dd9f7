"""Attention benchmark: every linear-attention backend against torch's SDPA, in one run.

For each head layout (SD-1.5: 8 heads of 40/80/160; SD-XL: 10 heads of 64), dtype, mode (forward,
forward+backward) and sequence length it records:

* the median of ``repeats`` timed runs after ``warmup`` untimed ones, for each backend and for
  ``torch.nn.functional.scaled_dot_product_attention`` (skipped, with the reason, where a call is
  predicted to exceed a cap or the run's SDPA budget is spent; the prediction extrapolates the last
  measured smaller size quadratically);
* a memory-traffic floor measured in the same run: the time of reading q, k, v and writing one output
  with a single fused element-wise op (``torch.addcmul(q, k, v)``), with a freshly allocated output as
  the op itself must, and with a preallocated one (strict); for forward+backward, plus reading q, k, v and
  the output gradient and writing three gradients (``q + g``, ``k.clone()``, ``v.clone()``);
* peak extra memory over the inputs: exact torch tensor allocations (CPU: profiler memory events; CUDA:
  ``max_memory_allocated``) and, on CPU, the peak RSS increase in a child process whose malloc returns
  large blocks to the OS (so RSS follows live memory);
* the error of each backend against the fp32 reference, and, at the largest size, the error of fp16 and
  bf16 inputs against the fp32 reference.

Results go to ``<out>/attention-<device>-<date>[-tag].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..ops import linear_attention, linear_attention_reference
from ..ops.chunked import new_output
from ..runtime import return_freed_memory
from .harness import BenchmarkInputError, environment, loadavg, rss_peak, wait_for_idle, write_results

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

# The op's CPU targets (fp32, B=1, 8 heads, d=40), evaluated in the JSON (docs/kernels.md).
TARGETS = {
    "speedup_vs_sdpa_at_16384": 60.0,
    "speedup_vs_sdpa_at_65536": 150.0,
    "time_over_floor_at_ge_65536": 3.0,
    "peak_extra_memory_over_qkv": 0.5,
    "half_precision_max_rel_err": 2e-2,
}


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


def _csv(text: str, cast: Callable[[str], Any] = str) -> list[Any]:
    return [cast(part.strip()) for part in text.split(",") if part.strip()]


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Translate parsed CLI options (see :mod:`linfusion.bench.cli`) into a config."""
    return BenchConfig(
        tokens=_csv(args.tokens, int),
        wide_max_tokens=args.wide_max_tokens,
        head_dims=_csv(args.head_dims, int),
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


# ----------------------------------------------------------------------------------------------------
# Small utilities


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layout(head_dim: int, heads: int | None) -> tuple[str, int]:
    name, default_heads = LAYOUTS.get(head_dim, (f"{head_dim}-dim heads", 8))
    return name, heads or default_heads


def _make_qkv(
    batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(3):
        t = torch.randn(batch, heads, tokens, head_dim, generator=generator, dtype=torch.float32)
        out.append(t.to(device=device, dtype=dtype))
    return out[0], out[1], out[2]


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (fp64 arithmetic on the maxima)."""
    diff = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    return float(diff / scale) if scale > 0 else float(diff)


def _op(backend: str, eps: float = 1e-4) -> Callable[..., torch.Tensor]:
    if backend == "sdpa":
        return F.scaled_dot_product_attention
    return lambda q, k, v: linear_attention(q, k, v, eps=eps, backend=backend)


def _time_calls(
    fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device, warm_fn: Callable[[], Any] | None
) -> list[float]:
    for _ in range(warmup):
        (warm_fn or fn)()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _case_callable(
    backend: str, mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> Callable[[], Any]:
    op = _op(backend)
    if mode == "forward":

        def forward() -> Any:
            with torch.no_grad():
                return op(q, k, v)

        return forward
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    grad = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)

    def forward_backward() -> None:
        op(*leaves).backward(grad)
        for t in leaves:  # inside the call, so that every call (and memory probe) starts without grads
            t.grad = None

    return forward_backward


def _floor_callable(mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fresh: bool) -> Callable:
    """Minimal-traffic stand-ins: read q, k, v once and write one output (plus the backward's traffic).

    ``fresh`` allocates the outputs per call exactly as the op does (:func:`new_output`), so page-fault
    costs are on both sides; otherwise they are preallocated (the strict floor: pure traffic).
    """
    alloc = new_output if fresh else None
    out = torch.empty_like(q)
    grad = torch.randn_like(q)
    grads = [torch.empty_like(t) for t in (q, k, v)]

    def forward() -> None:
        torch.addcmul(q, k, v, out=alloc(q) if alloc else out)

    def forward_backward() -> None:
        forward()
        dq, dk, dv = (alloc(t) for t in (q, k, v)) if alloc else grads
        torch.add(q, grad, out=dq)
        dk.copy_(k)
        dv.copy_(v)

    return forward if mode == "forward" else forward_backward


def _arithmetic_callable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable:
    """The unavoidable arithmetic of the chunked forward with torch's kernels, without anything else:
    exp over q and k, phi(K)^T V and phi(Q) [S | m] as chunked GEMMs on cache-resident operands.
    Reported next to the memory-traffic floor because on a few CPU cores this op is compute bound."""
    from ..ops.chunked import default_chunk_size, heads_view

    b, h, n, d = q.shape
    e = v.shape[-1]
    chunk = default_chunk_size(b * h, n, d, q.device, q.element_size())
    q3, k3, v3 = (heads_view(t) for t in (q, k, v))
    if q3 is None or k3 is None or v3 is None or q.dtype != torch.float32:
        return lambda: None
    buf = torch.empty(b * h, chunk, d)
    state = torch.zeros(b * h, d, e + 1)
    wide = torch.empty(b * h, chunk, e + 1)

    def run() -> None:
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            phi = buf[:, : end - start]
            torch.exp(k3[:, start:end], out=phi)
            state[..., :e].baddbmm_(phi.transpose(1, 2), v3[:, start:end])
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            phi = buf[:, : end - start]
            torch.exp(q3[:, start:end], out=phi)
            torch.bmm(phi, state, out=wide[:, : end - start])

    return run


# ----------------------------------------------------------------------------------------------------
# Memory


def tensor_peak_bytes_cpu(fn: Callable[[], Any]) -> int:
    """Peak bytes of torch CPU tensor allocations alive at once during fn, beyond those before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _memory_case(case: dict[str, Any], device: torch.device) -> dict[str, Any]:
    dtype = DTYPES[case["dtype"]]
    q, k, v = _make_qkv(
        case["batch"], case["heads"], case["tokens"], case["head_dim"], dtype, device, case["seed"]
    )
    qkv_bytes = 3 * q.numel() * q.element_size()
    fn = _case_callable(case["backend"], case["mode"], q, k, v)
    result: dict[str, Any] = {"qkv_bytes": qkv_bytes}
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        result["tensor_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        fn()  # first call outside the measurement (lazy initialisation of kernels, thread pools)
        result["rss_peak_bytes"] = rss_peak(fn)
        result["tensor_peak_bytes"] = tensor_peak_bytes_cpu(fn)
    result["tensor_peak_over_qkv"] = result["tensor_peak_bytes"] / qkv_bytes
    if result.get("rss_peak_bytes") is not None:
        result["rss_peak_over_qkv"] = result["rss_peak_bytes"] / qkv_bytes
    return result


def memory_worker(cases: list[dict[str, Any]], device_name: str, threads: int | None) -> list[dict[str, Any]]:
    """Measure the peak memory of each case (run in a child process on CPU, see module docstring)."""
    device = torch.device(device_name)
    malloc_limited = device.type == "cpu" and return_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    out = []
    for case in cases:
        try:
            measured = _memory_case(case, device)
            measured["malloc_limited"] = malloc_limited
        except Exception as error:  # noqa: BLE001 - report (e.g. out of memory) and go on
            measured = {"error": f"{type(error).__name__}: {error}"}
        out.append({**case, **measured})
        gc.collect()
    return out


def _measure_memory(cases: list[dict[str, Any]], device: torch.device, threads: int | None) -> list[dict]:
    if not cases:
        return []
    if device.type != "cpu":
        return memory_worker(cases, str(device), threads)
    payload = json.dumps({"cases": cases, "device": "cpu", "threads": threads})
    proc = subprocess.run(
        [sys.executable, "-m", "linfusion.bench.attention", "--memory-worker"],
        input=payload,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# Checks


def sdpa_agreement(device: torch.device, seed: int = 0, tokens: int = 256, head_dim: int = 40) -> dict:
    """A case where softmax and linear attention must agree: identical keys make every attention
    weight equal, so both outputs are the mean of v (linear attention up to its eps shrink). Checks that
    the benchmark feeds both ops the same (B, H, N, d) tensors."""
    q, k, v = _make_qkv(1, 2, tokens, head_dim, torch.float32, device, seed)
    k = k[:, :, :1].expand_as(k).contiguous()
    lin = linear_attention(q, k, v)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    mean = v.mean(dim=2, keepdim=True).expand_as(v)
    return {
        "tokens": tokens,
        "head_dim": head_dim,
        "linfusion_vs_sdpa_rel_err": _rel_err(lin, sdpa),
        "sdpa_vs_mean_rel_err": _rel_err(sdpa, mean),
        "linfusion_vs_mean_rel_err": _rel_err(lin, mean),
    }


def _reference_by_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The fp32 reference, one head at a time (bounded memory at a million tokens)."""
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            sl = (slice(b, b + 1), slice(h, h + 1))
            out[sl] = linear_attention_reference(q[sl], k[sl], v[sl])
    return out


def half_precision_accuracy(
    tokens: int, head_dim: int, heads: int, batch: int, dtypes: list[str], device: torch.device, seed: int
) -> list[dict[str, Any]]:
    """fp16/bf16 inputs through ``auto`` against the fp32 reference on the same (rounded) inputs."""
    results = []
    for name in dtypes:
        dtype = DTYPES[name]
        q, k, v = _make_qkv(batch, heads, tokens, head_dim, dtype, device, seed)
        start = time.perf_counter()
        out = linear_attention(q, k, v)
        _sync(device)
        seconds = time.perf_counter() - start
        expected = _reference_by_head(q, k, v)
        results.append(
            {
                "dtype": name,
                "tokens": tokens,
                "head_dim": head_dim,
                "heads": heads,
                "backend": "auto",
                "finite": bool(torch.isfinite(out).all().item()),
                "max_rel_err": _rel_err(out, expected),
                "seconds_single_run": seconds,
            }
        )
        del q, k, v, out, expected
        gc.collect()
    return results


# ----------------------------------------------------------------------------------------------------
# The run


class _SdpaPlanner:
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


def _cases(cfg: BenchConfig) -> list[tuple[str, int, int, str, int]]:
    """(mode, head_dim, heads, dtype, tokens) in run order.

    The headline series (first mode, first head dim, first dtype) runs first and in full, so the SDPA
    budget is spent on it before anything else; every other case follows, smallest first, so that the
    remaining budget buys SDPA baselines for as many layouts as possible.
    """
    out = []
    for mode in cfg.modes:
        for head_dim in cfg.head_dims:
            _, heads = _layout(head_dim, cfg.heads)
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
    device = _resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    backends = list(cfg.backends)
    if device.type == "cuda" and "triton" not in backends:
        from ..ops import available_backends

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
    planner = _SdpaPlanner(cfg.sdpa_cap_seconds, cfg.sdpa_budget_seconds)
    memory_cases: list[dict[str, Any]] = []
    for mode, head_dim, heads, dtype_name, tokens in _cases(cfg):
        dtype = DTYPES[dtype_name]
        layout_name, _ = _layout(head_dim, heads)
        q, k, v = _make_qkv(cfg.batch, heads, tokens, head_dim, dtype, device, cfg.seed)
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
            times = _time_calls(_floor_callable(mode, q, k, v, fresh), cfg.repeats, cfg.warmup, device, None)
            floors[label] = statistics.median(times)
        if mode == "forward" and device.type == "cpu":
            arithmetic = _time_calls(_arithmetic_callable(q, k, v), cfg.repeats, cfg.warmup, device, None)
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
                    warm_fn = _case_callable(backend, mode, *small)
                    entry["warmup_tokens"] = small[0].shape[2]
                entry["sdpa_predicted_seconds"] = predicted
            fn = _case_callable(backend, mode, q, k, v)
            started = time.perf_counter()
            try:
                times = _time_calls(fn, cfg.repeats, cfg.warmup, device, warm_fn)
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
                    entry["max_rel_err_vs_reference"] = _rel_err(_op(backend)(q, k, v), reference_out)
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
        measured = _measure_memory(memory_cases, device, cfg.threads)
        _attach_memory(result["cases"], measured)
    if cfg.accuracy_dtypes:
        head_dim = cfg.head_dims[0]
        _, heads = _layout(head_dim, cfg.heads)
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


def evaluate_targets(result: dict[str, Any]) -> dict[str, Any]:
    """Issue-3 targets on this run's numbers (fp32, 8 heads, d=40, chunked); None where not measured."""
    cases = [
        c
        for c in result["cases"]
        if c["dtype"] == "float32" and c["head_dim"] == 40 and c["heads"] == 8 and c["batch"] == 1
    ]

    def pick(backend: str, mode: str, tokens: int) -> dict[str, Any] | None:
        for c in cases:
            if c["backend"] == backend and c["mode"] == mode and c["tokens"] == tokens:
                return c
        return None

    out: dict[str, Any] = {}
    for tokens, name in ((16384, "speedup_vs_sdpa_at_16384"), (65536, "speedup_vs_sdpa_at_65536")):
        c = pick("chunked", "forward", tokens)
        value = c.get("speedup_vs_sdpa") if c else None
        out[name] = {
            "value": value,
            "target": TARGETS[name],
            "met": None if value is None else value >= TARGETS[name],
        }
    big = [c for c in cases if c["backend"] == "chunked" and c["mode"] == "forward" and c["tokens"] >= 65536]
    for floor in ("fresh", "prealloc"):
        worst = max((c[f"over_floor_{floor}"] for c in big), default=None)
        out[f"time_over_floor_{floor}_at_ge_65536"] = {
            "value": worst,
            "target": TARGETS["time_over_floor_at_ge_65536"],
            "met": None if worst is None else worst <= TARGETS["time_over_floor_at_ge_65536"],
        }
    arith = [c["median_s"] / c["arithmetic_floor_s"] for c in big if c.get("arithmetic_floor_s")]
    out["time_over_arithmetic_floor_at_ge_65536"] = {
        "value": max(arith, default=None),
        "target": None,
        "met": None,
        "note": "information: exp over q, k and the two chunked GEMMs alone (see arithmetic_floor_s)",
    }
    mems = [
        c["tensor_peak_over_qkv"]
        for c in cases
        if c["backend"] == "chunked" and c["mode"] == "forward" and "tensor_peak_over_qkv" in c
    ]
    worst_mem = max(mems, default=None)
    out["peak_extra_memory_over_qkv"] = {
        "value": worst_mem,
        "target": TARGETS["peak_extra_memory_over_qkv"],
        "met": None if worst_mem is None else worst_mem <= TARGETS["peak_extra_memory_over_qkv"],
        "note": "forward, torch tensor allocations incl. the output, worst over the measured sizes",
    }
    halves = result.get("half_precision", [])
    if halves:
        worst_half = max(h["max_rel_err"] for h in halves)
        out["half_precision_max_rel_err"] = {
            "value": worst_half,
            "tokens": halves[0]["tokens"],
            "target": TARGETS["half_precision_max_rel_err"],
            "met": worst_half <= TARGETS["half_precision_max_rel_err"] and all(h["finite"] for h in halves),
        }
    return out


# ----------------------------------------------------------------------------------------------------
# Reports


def _fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def _fmt_mib(n: int | None) -> str:
    """MiB with one decimal, the unit the attention tables state in their headers."""
    if n is None:
        return "-"
    return f"{n / 2**20:,.1f}"


def markdown_report(result: dict[str, Any]) -> str:
    """Tables: per case, each backend's median time, x vs SDPA, time / floor, memory / (q+k+v)."""
    env = result["environment"]
    lines = [
        f"# Attention benchmark ({env['device']}{', ' + env.get('gpu_name', '') if env.get('gpu_name') else ''})",
        "",
        f"- CPU: {env['cpu_model']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads)",
        f"- torch {env['torch_version']}, linfusion {env['linfusion_version']}, triton {env['triton_version']}",
        f"- command: `{env['command']}`",
        f"- {env['timestamp']}; load average at start {env.get('loadavg_start')}, end {env.get('loadavg_end')}",
        f"- median of {result['config']['repeats']} runs after {result['config']['warmup']} warm-up; "
        "`/ floor` = time over the memory-traffic floor (one fused read of q, k, v and write of one "
        "output, allocated like the op's; strict floor: output preallocated); arith = exp over q and k "
        "plus the two chunked GEMMs alone (CPU forward); mem = peak torch allocations beyond the inputs "
        "(output included) / size of q+k+v",
        "",
    ]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for case in result["cases"]:
        groups.setdefault(
            (case["mode"], case["layout"], case["heads"], case["head_dim"], case["dtype"]), []
        ).append(case)
    backends = [b for b in result["backends"] if any(c["backend"] == b for c in result["cases"])]
    for (mode, layout, heads, head_dim, dtype), cases in groups.items():
        lines.append(f"## {mode}, {layout} ({heads} heads x {head_dim}), {dtype}")
        lines.append("")
        header = ["tokens", "SDPA ms"]
        for b in backends:
            header += [f"{b} ms", f"{b} x SDPA", f"{b} / floor", f"{b} mem"]
        header += ["floor ms", "strict floor ms", "arith ms", "SDPA mem"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        by_tokens: dict[int, dict[str, dict[str, Any]]] = {}
        for c in cases:
            by_tokens.setdefault(c["tokens"], {})[c["backend"]] = c
        for tokens in sorted(by_tokens):
            row = by_tokens[tokens]
            sdpa = row.get("sdpa")
            cells = [f"{tokens:,}", _fmt_ms(sdpa["median_s"]) if sdpa else "skipped"]
            floor = strict = arith = None
            for b in backends:
                c = row.get(b)
                if c is None:
                    cells += ["-", "-", "-", "-"]
                    continue
                floor, strict = c["floor_fresh_s"], c["floor_prealloc_s"]
                arith = c.get("arithmetic_floor_s")
                speed = c.get("speedup_vs_sdpa")
                mem = c.get("tensor_peak_over_qkv")
                cells += [
                    _fmt_ms(c["median_s"]),
                    f"{speed:,.0f}x" if speed else "-",
                    f"{c['over_floor_fresh']:.1f}",
                    f"{mem:.2f}" if mem is not None else "-",
                ]
            sdpa_mem = sdpa.get("tensor_peak_over_qkv") if sdpa else None
            cells += [_fmt_ms(floor), _fmt_ms(strict), _fmt_ms(arith)]
            cells.append(f"{sdpa_mem:.2f}" if sdpa_mem is not None else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if result["skipped"]:
        lines.append("## Skipped")
        lines.append("")
        for s in result["skipped"]:
            lines.append(
                f"- {s['mode']}, d={s['head_dim']}, {s['dtype']}, {s['tokens']:,} tokens, {s['backend']}: "
                f"{s['reason']}"
            )
        lines.append("")
    if result.get("half_precision"):
        lines.append("## Half precision vs the fp32 reference")
        lines.append("")
        lines.append("| dtype | tokens | heads x d | finite | max rel err |")
        lines.append("|---|---|---|---|---|")
        for h in result["half_precision"]:
            lines.append(
                f"| {h['dtype']} | {h['tokens']:,} | {h['heads']} x {h['head_dim']} | {h['finite']} | "
                f"{h['max_rel_err']:.2e} |"
            )
        lines.append("")
    agreement = result.get("sdpa_agreement")
    if agreement:
        lines.append(
            "SDPA wiring check (identical keys, both must give mean(v)): linfusion vs SDPA rel err "
            f"{agreement['linfusion_vs_sdpa_rel_err']:.1e}."
        )
        lines.append("")
    if result.get("targets"):
        lines.append("## Targets (fp32, 8 heads x 40, chunked)")
        lines.append("")
        for name, t in result["targets"].items():
            value = t["value"]
            shown = "-" if value is None else (f"{value:.3g}")
            verdict = "met" if t["met"] else "NOT met" if t["met"] is False else "not measured"
            if t["target"] is None:
                verdict = "information"
            lines.append(f"- {name}: {shown} (target {t['target']}) -> {verdict}")
        lines.append("")
    return "\n".join(lines)


def plot_report(result: dict[str, Any], path: Path) -> bool:
    """Log-log time and memory vs tokens (forward, fp32): SDPA vs linfusion chunked. False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = [c for c in result["cases"] if c["mode"] == "forward" and c["dtype"] == "float32"]
    layouts = sorted({(c["head_dim"], c["heads"], c["layout"]) for c in cases})
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (head_dim, heads, layout) in enumerate(layouts):
        color = colors[i % len(colors)]
        label = f"{layout} ({heads}x{head_dim})"
        for backend, style in (("chunked", "-o"), ("sdpa", "--s"), ("reference", ":^")):
            pts = sorted(
                (c["tokens"], c["median_s"], c.get("tensor_peak_bytes"))
                for c in cases
                if c["backend"] == backend and c["head_dim"] == head_dim and c["heads"] == heads
            )
            if not pts:
                continue
            name = {"chunked": "linfusion", "sdpa": "SDPA", "reference": "naive linear"}[backend]
            if backend != "reference":  # time: SDPA vs linfusion; the memory panel adds the naive version
                ax_t.plot(
                    [p[0] for p in pts],
                    [p[1] * 1e3 for p in pts],
                    style,
                    color=color,
                    label=f"{name}, {label}",
                )
            mem = [(p[0], p[2]) for p in pts if p[2] is not None]
            if mem:
                ax_m.plot(
                    [p[0] for p in mem],
                    [p[1] / 2**20 for p in mem],
                    style,
                    color=color,
                    label=f"{name}, {label}" if backend == "reference" else None,
                    alpha=0.6 if backend == "reference" else 1.0,
                )
        floor = sorted(
            {
                (c["tokens"], c["floor_fresh_s"])
                for c in cases
                if c["head_dim"] == head_dim and c["heads"] == heads
            }
        )
        if floor and i == 0:
            ax_t.plot(
                [p[0] for p in floor],
                [p[1] * 1e3 for p in floor],
                ":",
                color="gray",
                label="memory-traffic floor",
            )
    env = result["environment"]
    for ax, title, ylabel in (
        (ax_t, "forward time", "ms (median)"),
        (ax_m, "peak extra memory", "MiB (torch allocations)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    if ax_m.get_legend_handles_labels()[0]:
        ax_m.legend(fontsize=7)
    fig.suptitle(
        f"LinFusion attention vs SDPA, fp32, batch {result['config']['batch']} - {env['cpu_model']}, "
        f"torch threads: {env['torch_threads']}, torch {env['torch_version']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(result: dict[str, Any], out_dir: Path, tag: str = "", plot: bool = True) -> dict[str, Path]:
    """Write JSON, Markdown and (if matplotlib is there) PNG; return their paths."""
    date = result["environment"]["timestamp"][:10]
    stem = f"attention-{result['environment']['device']}-{date}" + (f"-{tag}" if tag else "")
    paths = write_results(out_dir, stem, result, markdown_report(result))
    if plot:
        png = out_dir / f"{stem}.png"
        if plot_report(result, png):
            paths["png"] = png
        else:
            print("matplotlib is not installed: no plot written (pip install 'linfusion[bench]')")
    return paths


def effective_command(args: argparse.Namespace) -> str:
    """The run as an explicit ``linfusion bench attention`` command line, every option spelled out."""
    parts = ["linfusion", "bench", "attention"]
    for name, value in sorted(vars(args).items()):
        if name in ("func", "command", "bench_command") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``linfusion bench attention`` and ``benchmarks/attention.py``."""
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle, args.idle_load)
    cfg = config_from_args(args)
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


if __name__ == "__main__":  # the CPU memory worker (a fresh process: RSS depends on the heap's history)
    if sys.argv[1:2] == ["--memory-worker"]:
        payload = json.loads(sys.stdin.read())
        print(json.dumps(memory_worker(payload["cases"], payload["device"], payload.get("threads"))))
