"""``linfusion bench attention`` on one tiny size: the outputs exist, carry the required fields, and the
numbers it checks agree (no timing assertions: the machine may be busy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from linfusion.bench.attention import sdpa_agreement
from linfusion.cli import main


@pytest.mark.multiprocess
def test_bench_attention_cli_writes_complete_results(tmp_path: Path) -> None:
    code = main(
        [
            "bench", "attention",
            "--tokens", "128", "--head-dims", "40", "--heads", "2",
            "--backends", "chunked", "--modes", "forward,forward+backward",
            "--repeats", "1", "--warmup", "0",
            "--accuracy-dtypes", "bfloat16", "--accuracy-tokens", "512",
            "--out", str(tmp_path), "--tag", "smoke",
        ]
    )  # fmt: skip
    assert code == 0
    [json_path] = tmp_path.glob("attention-cpu-*-smoke.json")
    result = json.loads(json_path.read_text())

    env = result["environment"]
    for key in ("device", "cpu_model", "torch_version", "linfusion_version", "torch_threads", "command"):
        assert env[key] not in (None, ""), key
    assert "bench attention" in env["command"] and env["timestamp"]

    cases = {(c["mode"], c["backend"]): c for c in result["cases"]}
    assert set(cases) == {(m, b) for m in ("forward", "forward+backward") for b in ("chunked", "sdpa")}
    for case in cases.values():
        assert case["tokens"] == 128 and case["heads"] == 2 and case["head_dim"] == 40
        assert len(case["times_s"]) == 1 and case["median_s"] > 0
        assert case["floor_fresh_s"] > 0 and case["over_floor_fresh"] > 0
        assert case["tensor_peak_bytes"] > 0 and case["tensor_peak_over_qkv"] > 0
    assert cases[("forward", "chunked")]["speedup_vs_sdpa"] > 0
    assert cases[("forward", "chunked")]["max_rel_err_vs_reference"] < 1e-5

    [half] = result["half_precision"]
    assert half["dtype"] == "bfloat16" and half["finite"] and half["max_rel_err"] < 2e-2
    agreement = result["sdpa_agreement"]
    assert agreement["linfusion_vs_sdpa_rel_err"] < 1e-3 and agreement["sdpa_vs_mean_rel_err"] < 1e-5
    assert set(result["targets"]) >= {"speedup_vs_sdpa_at_16384", "peak_extra_memory_over_qkv"}

    markdown = (tmp_path / json_path.name.replace(".json", ".md")).read_text()
    assert "| tokens | SDPA ms | chunked ms" in markdown and "| 128 |" in markdown
    pytest.importorskip("matplotlib")
    assert (tmp_path / json_path.name.replace(".json", ".png")).stat().st_size > 1000


def test_sdpa_agreement_detects_mismatch() -> None:
    """The wiring check is a real check: both ops reduce to mean(v) for identical keys only."""
    import torch

    good = sdpa_agreement(torch.device("cpu"), tokens=64)
    assert good["linfusion_vs_sdpa_rel_err"] < 1e-3
    assert good["linfusion_vs_mean_rel_err"] < 1e-3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tokens", "0"], "--tokens needs whole numbers >= 1"),
        (["--tokens", "abc"], "--tokens 'abc': expected comma-separated whole numbers"),
        (["--head-dims", "40,x"], "--head-dims '40,x'"),
        (["--backends", "bogus"], "unknown backend(s) ['bogus']"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--batch", "-1"], "--batch must be >= 1"),
    ],
)
def test_bad_lists_and_counts_are_one_line_errors(
    capsys: pytest.CaptureFixture, tmp_path, argv: list[str], message: str
) -> None:
    from linfusion.cli import main

    assert main(["bench", "attention", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and list(tmp_path.iterdir()) == []
