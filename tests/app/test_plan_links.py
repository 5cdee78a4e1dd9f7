"""Predicted times of ``linfusion plan``: compute time plus host<->device transfer time over the link."""

from __future__ import annotations

import pytest
import torch

from linfusion.app.params import GenerationError
from linfusion.app.plan import EFFICIENCY, GPUS, LINK_EFFICIENCY, LINKS, PlannedRun, PlanRequest, validate
from linfusion.pipelines.chain import Stage
from linfusion.planner import MemoryPlan, Savers, StagePlan

GIB = 2**30


def planned(link: str | None, gpu: str = "h100") -> PlannedRun:
    stages = (
        StagePlan(512, 512, Savers(), 10, 20, 30, flops=10**15),
        StagePlan(1024, 1024, Savers(tiled_vae=True, vae_store_on_host=True), 10, 20, 30, flops=4 * 10**15,
                  transfer_bytes=100 * GIB),
    )  # fmt: skip
    plan = MemoryPlan(12 * GIB, torch.device("cuda"), stages, 64 * GIB)
    request = PlanRequest(link=link, gpu=gpu)
    return PlannedRun(request, (Stage(512, 512, None), Stage(1024, 1024, 0.6)), (25, 15), plan, 1, "exact")


def test_transfer_seconds_are_bytes_over_the_links_effective_rate() -> None:
    compute = [flops / (GPUS["h100"].peak["float16"] * EFFICIENCY) for flops in (10**15, 4 * 10**15)]
    for link in ("pcie4", "pcie5"):
        run = planned(link)
        moved = 100 * GIB / (LINKS[link] * LINK_EFFICIENCY)
        assert run.transfer_seconds() == [0.0, pytest.approx(moved)]
        assert run.predicted_seconds() == [pytest.approx(compute[0]), pytest.approx(compute[1] + moved)]
    slower = planned("pcie4").predicted_seconds()[1] - planned("pcie5").predicted_seconds()[1]
    assert slower == pytest.approx(
        100 * GIB / (32e9 * LINK_EFFICIENCY) - 100 * GIB / (64e9 * LINK_EFFICIENCY)
    )


def test_the_default_link_is_the_gpus_own_and_json_and_text_report_it() -> None:
    assert planned(None, "h100").link == "pcie5" and planned(None, "a100").link == "pcie4"
    data = planned(None).to_json()
    assert [stage["transfer_bytes"] for stage in data["stages"]] == [0, 100 * GIB]
    assert data["stages"][1]["transfer_seconds"] > 0 and data["prediction"]["link"] == "pcie5"
    text = planned("pcie4").describe()
    assert "100.00 GiB host<->device" in text and "transfers over pcie4" in text


def test_an_unknown_link_is_refused() -> None:
    with pytest.raises(GenerationError, match="unknown link 'pcie9'"):
        validate(PlanRequest(link="pcie9"))
