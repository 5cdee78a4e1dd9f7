"""The op's CPU targets and how this run's numbers meet them."""

from __future__ import annotations

from typing import Any

# The op's CPU targets (fp32, B=1, 8 heads, d=40), evaluated in the JSON (docs/kernels.md).
TARGETS = {
    "speedup_vs_sdpa_at_16384": 60.0,
    "speedup_vs_sdpa_at_65536": 150.0,
    "time_over_floor_at_ge_65536": 3.0,
    "peak_extra_memory_over_qkv": 0.5,
    "half_precision_max_rel_err": 2e-2,
}


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
