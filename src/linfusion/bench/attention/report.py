"""The run as Markdown tables and a log-log plot, written next to its JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..harness import write_results


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
