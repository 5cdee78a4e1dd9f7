"""``linfusion plan``: plans for any machine without a GPU or weights, as text or one JSON object.

The headline check: full-size SD-1.5 fits 12 GB and SD-XL 16 GB of device memory at 16K, with at most
64 GiB of host memory, FLOPs reported per stage.
"""

from __future__ import annotations

import json

import pytest

from linfusion.cli import main as linfusion
from linfusion.io import parse_size

GIB = 2**30


def plan(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, dict]:
    code = linfusion(["plan", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_bundled_model_on_the_cpu_fits_and_reports_every_stage(capsys: pytest.CaptureFixture) -> None:
    code, result = plan(capsys, "--model", "bundled", "--size", "256x128", "--device", "cpu",
                        "--dtype", "float32", "--max-memory", "8GB", "--steps", "10")  # fmt: skip
    assert code == 0 and result["fits"] is True
    assert result["device_budget_bytes"] == 8 * GIB
    sizes = [(stage["width"], stage["height"]) for stage in result["stages"]]
    assert sizes == [(32, 16), (64, 32), (128, 64), (256, 128)]  # native 32 px, doubling to the target
    for stage in result["stages"]:
        assert isinstance(stage["device_peak_bytes"], int) and stage["device_peak_bytes"] > 0
        assert isinstance(stage["host_peak_bytes"], int) and stage["flops"] > 0
        assert isinstance(stage["savers"], list) and stage["predicted_seconds"] > 0
        assert stage["transfer_bytes"] == 0 and stage["transfer_seconds"] == 0  # the CPU parks nothing
    flops = [stage["flops"] for stage in result["stages"]]
    assert flops[-1] > flops[1]  # the largest stage costs the most


@pytest.mark.slow
def test_transfers_add_their_link_time_to_the_prediction(capsys: pytest.CaptureFixture) -> None:
    """On CUDA at the smallest budget the stage parks on the host: its transfer bytes over the link's
    effective rate are added to the compute time (FLOPs over the GPU's sustained rate)."""
    from linfusion.app.plan import EFFICIENCY, GPUS, LINK_EFFICIENCY, LINKS

    code, result = plan(capsys, "--model", "bundled", "--size", "64x64", "--mode", "plain", "--device", "cuda",
                        "--max-memory", "1MB", "--link", "pcie4")  # fmt: skip
    assert code == 3 and result["prediction"]["link"] == "pcie4"
    [stage] = result["stages"]
    assert stage["transfer_bytes"] > 0
    assert stage["transfer_seconds"] == pytest.approx(
        stage["transfer_bytes"] / (LINKS["pcie4"] * LINK_EFFICIENCY)
    )
    compute = stage["flops"] / (GPUS["h100"].peak["float16"] * EFFICIENCY)
    assert stage["predicted_seconds"] == pytest.approx(compute + stage["transfer_seconds"])


@pytest.mark.slow
def test_a_budget_too_small_exits_3_with_the_smallest_budgets(capsys: pytest.CaptureFixture) -> None:
    code = linfusion(
        ["plan", "--model", "bundled", "--size", "256x256", "--device", "cpu", "--max-memory", "1MB"]
    )
    text = capsys.readouterr().out
    assert code == 3 and "does NOT fit" in text
    smallest = text.split("smallest budgets that fit: --max-memory ")[1].split()[0]
    code, result = plan(
        capsys, "--model", "bundled", "--size", "256x256", "--device", "cpu", "--max-memory", smallest
    )
    assert code == 0 and result["fits"]  # the budget it names is enough


def test_bad_input_is_refused_with_a_message(capsys: pytest.CaptureFixture) -> None:
    assert (
        linfusion(
            ["plan", "--model", "bundled", "--size", "250x256", "--device", "cpu", "--max-memory", "8GB"]
        )
        == 2
    )
    assert "multiple of 8" in capsys.readouterr().err
    assert (
        linfusion(["plan", "--model", "no/such-model-here", "--size", "256x256", "--max-memory", "8GB"]) == 2
    )
    assert "could not load" in capsys.readouterr().err


@pytest.mark.slow
def test_one_rank_of_several_plans_its_stripe(capsys: pytest.CaptureFixture) -> None:
    argv = [
        "--model",
        "bundled",
        "--size",
        "512x512",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max-memory",
        "8GB",
    ]
    _, whole = plan(capsys, *argv)
    _, rank = plan(capsys, *argv, "--nproc", "2")
    assert rank["nproc"] == 2
    assert [s["height"] for s in rank["stages"]] == [s["height"] // 2 for s in whole["stages"]]
    assert rank["stages"][-1]["device_peak_bytes"] < whole["stages"][-1]["device_peak_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "budget"), [("random-sd15", "12GB"), ("random-sdxl", "16GB")], ids=["sd15-12GB", "sdxl-16GB"]
)
@pytest.mark.parametrize("size", ["16384x8192", "8192x16384", "16384x16384"])
def test_16k_fits_a_consumer_gpu(capsys: pytest.CaptureFixture, model: str, budget: str, size: str) -> None:
    code, result = plan(
        capsys, "--model", model, "--size", size, "--max-memory", budget, "--host-memory", "64GB"
    )
    assert code == 0 and result["fits"] is True, result
    assert result["device_peak_bytes"] <= parse_size(budget)
    assert result["host_peak_bytes"] <= 64 * GIB
    last = result["stages"][-1]
    assert (last["width"], last["height"]) == tuple(int(v) for v in size.split("x"))
    assert all(stage["flops"] > 0 for stage in result["stages"])
    assert last["flops"] <= 2.5 * last["plain_flops"]  # the bounded paths' recomputation stays modest


@pytest.mark.slow
def test_vae_attention_auto_plans_what_generate_would_run(capsys: pytest.CaptureFixture) -> None:
    """At 1024 px the bundled 2x VAE's mid-block attends over 512 x 512 tokens: auto picks the linear kernel
    (its fidelity is measured on this VAE), whose VAE FLOPs are far below the softmax attention's."""
    common = ("--model", "bundled", "--size", "1024x1024", "--device", "cpu", "--dtype", "float32",
              "--max-memory", "20GB", "--steps", "2")  # fmt: skip
    results = {}
    for mode in ("auto", "exact"):
        code, results[mode] = plan(capsys, *common, "--vae-attention", mode)
        assert code == 0
    assert results["auto"]["vae_attention"] == "linear"
    assert results["exact"]["vae_attention"] == "exact"
    tokens, channels = 512 * 512, 64  # softmax attention: QK^T and PV, decode and encode of the last stage
    assert results["exact"]["flops"] - results["auto"]["flops"] > 2 * 4 * tokens**2 * channels * 0.9
    small = plan(capsys, *common[:2], "--size", "64x64", *common[4:], "--vae-attention", "auto")[1]
    assert small["vae_attention"] == "exact"  # cheap at 32 x 32 tokens


def test_budgets_are_parsed_where_they_are_typed(capsys: pytest.CaptureFixture) -> None:
    """argparse reads ``--max-memory`` / ``--host-memory`` into bytes once; an unreadable one is refused
    there (exit status 2, no traceback), before any model is built."""
    from linfusion.cli import build_parser

    args = build_parser().parse_args(
        ["plan", "--size", "64x64", "--max-memory", "1.5GB", "--host-memory", "512MB"]
    )
    assert (args.max_memory, args.host_memory) == (3 * 2**29, 512 * 2**20)
    with pytest.raises(SystemExit) as exited:
        linfusion(["plan", "--size", "64x64", "--max-memory", "lots"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "cannot read memory size 'lots'" in err and "Traceback" not in err


def test_a_zero_size_is_refused_not_replaced_by_the_native_one(capsys: pytest.CaptureFixture) -> None:
    assert linfusion(["plan", "--size", "0x0", "--device", "cpu", "--max-memory", "1GB"]) == 2
    assert "width 0 is not a positive multiple of 8" in capsys.readouterr().err


def test_a_cpu_plan_is_float32_and_predicts_this_cpu(capsys: pytest.CaptureFixture) -> None:
    assert linfusion(["plan", "--size", "64x64", "--device", "cpu", "--max-memory", "1GB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "float32" and result["prediction"]["cpu"] == "this machine"
    assert "gpu" not in result["prediction"] and all(s["transfer_seconds"] == 0 for s in result["stages"])
    assert linfusion(["plan", "--size", "64x64", "--device", "cpu", "--max-memory", "1GB"]) == 0
    text = capsys.readouterr().out
    assert "float32 on cpu" in text and "on this machine's CPU" in text and "H100" not in text


# ---------------------------------------------------------------------- PixArt (diffusion transformers)
PLAN_KEYS = {"fits", "device", "device_budget_bytes", "host_budget_bytes", "device_peak_bytes", "host_peak_bytes",
             "flops", "stages", "model", "mode", "dtype", "nproc", "vae_attention", "prediction"}  # fmt: skip
STAGE_KEYS = {"width", "height", "device_peak_bytes", "host_peak_bytes", "flops", "plain_flops", "transfer_bytes",
              "savers", "strength", "unet_calls", "predicted_seconds", "transfer_seconds", "call_flops"}  # fmt: skip


@pytest.mark.slow
def test_16k_pixart_sigma_fits_12_gib(capsys: pytest.CaptureFixture) -> None:
    """16384x8192 px (524,288 tokens at the last stage) on a 12 GiB GPU: T5-XXL's 9.5 GB are the text phase's
    alone (model offload), the transformer's phase fits beside the transformer's weights."""
    code, result = plan(capsys, "--model", "random-pixart-sigma", "--size", "16384x8192", "--max-memory", "12GB",
                        "--host-memory", "64GB")  # fmt: skip
    assert code == 0 and result["fits"] is True, result
    assert set(result) == PLAN_KEYS and all(set(stage) == STAGE_KEYS for stage in result["stages"])
    assert result["device_peak_bytes"] <= 12 * GIB and result["host_peak_bytes"] <= 64 * GIB
    last = result["stages"][-1]
    assert (last["width"], last["height"]) == (16384, 8192)
    assert "model CPU offload" in last["savers"]
    assert any("banded DiT" in saver for stage in result["stages"] for saver in stage["savers"])
    # T5 fits the budget alone: the prompt is encoded on the device, as the plan always did
    assert not any("prompt encoded on the CPU" in stage["savers"] for stage in result["stages"])
    assert all(stage["flops"] > 0 and stage["predicted_seconds"] > 0 for stage in result["stages"])
    assert last["transfer_bytes"] > 0 and last["transfer_seconds"] > 0
    calls = last[
        "call_flops"
    ]  # one call of both CFG branches at 16K: LinFusion ~1.2 PFLOP, softmax ~60x more
    assert 1.0e15 < calls["linfusion"] < 1.3e15 and calls["softmax"] > 50 * calls["linfusion"]


@pytest.mark.slow
def test_16k_pixart_sigma_at_10_gib_runs_the_banded_dit(capsys: pytest.CaptureFixture) -> None:
    """Below the unbanded transformer's ~9 GiB of activations at 16K, only the banded DiT bounds them."""
    code, result = plan(capsys, "--model", "random-pixart-sigma", "--size", "16384x8192", "--mode", "plain",
                        "--steps", "2", "--max-memory", "10GB", "--host-memory", "64GB")  # fmt: skip
    assert code == 0 and result["fits"] is True, result
    (stage,) = result["stages"]
    assert any(saver.startswith("banded DiT") for saver in stage["savers"]), stage["savers"]
    assert stage["device_peak_bytes"] <= 10 * GIB


@pytest.mark.slow
def test_16k_pixart_sigma_fits_6_gib_with_the_prompt_encoded_on_the_cpu(
    capsys: pytest.CaptureFixture,
) -> None:
    """Below T5-XXL's 8.9 GiB the prompt is encoded on the CPU: the text phase takes no device memory, T5's
    weights wait in host memory, and the predicted time counts the CPU encode of every stage."""
    code, result = plan(capsys, "--model", "random-pixart-sigma", "--size", "16384x8192", "--max-memory", "6GB",
                        "--host-memory", "64GB")  # fmt: skip
    assert code == 0 and result["fits"] is True, result
    assert set(result) == PLAN_KEYS and all(set(stage) == STAGE_KEYS for stage in result["stages"])
    assert result["device_peak_bytes"] <= 6 * GIB and result["host_peak_bytes"] <= 64 * GIB
    t5 = 2 * 4_762_310_656
    for stage in result["stages"]:
        assert stage["savers"][-2:] == ["model CPU offload", "prompt encoded on the CPU"], stage["savers"]
        assert stage["host_peak_bytes"] > t5
        encode = stage["predicted_seconds"] - stage["transfer_seconds"] - stage["flops"] / (989.4e12 * 0.35)
        assert encode > 1.0  # 5.6 TFLOP on the CPU (prompt and negative prompt, 300 tokens each): not free
    assert any(saver.startswith("banded DiT") for saver in result["stages"][-1]["savers"])


@pytest.mark.parametrize("model", ["random-pixart-sigma", "random-pixart-alpha"])
def test_pixart_plans_at_1024_with_linfusion_mounted(capsys: pytest.CaptureFixture, model: str) -> None:
    code, result = plan(capsys, "--model", model, "--size", "1024x1024", "--mode", "plain", "--max-memory", "24GB",
                        "--steps", "20")  # fmt: skip
    assert code == 0 and result["fits"] is True
    assert set(result) == PLAN_KEYS
    (stage,) = result["stages"]
    assert set(stage) == STAGE_KEYS and stage["savers"] == [] and stage["unet_calls"] == 20
    # 20 calls of ~4.6 TFLOP (Sigma, both CFG branches) plus the VAE decode
    assert 20 * stage["call_flops"]["linfusion"] < stage["flops"] < 20 * stage["call_flops"]["softmax"]
    assert stage["call_flops"]["softmax"] > 1.1 * stage["call_flops"]["linfusion"]


@pytest.mark.slow
def test_pixart_4096_plan_and_the_softmax_plan(capsys: pytest.CaptureFixture) -> None:
    common = ("--model", "random-pixart-sigma", "--size", "4096x4096", "--mode", "plain", "--max-memory", "12GB",
              "--host-memory", "64GB", "--steps", "20")  # fmt: skip
    code, linfusion_plan = plan(capsys, *common)
    assert code == 0 and linfusion_plan["fits"] is True
    code, softmax_plan = plan(capsys, *common, "--no-linfusion")
    assert code == 0
    assert (
        softmax_plan["flops"] > 3 * linfusion_plan["flops"]
    )  # 65,536 tokens: the quadratic attention dominates
    assert linfusion_plan["stages"][0]["call_flops"] == softmax_plan["stages"][0]["call_flops"]
