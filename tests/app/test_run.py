"""The command line's runs: what they announce on stderr before the first step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from linfusion.app import run as app_run
from linfusion.app.params import GenerationParams
from linfusion.app.prepare import Budgets, prepare
from linfusion.testing import tiny_pipeline


def test_a_run_predicted_over_a_minute_is_announced_with_its_flops(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The plan's FLOPs over this device's sustained rate; announced only past ``ANNOUNCE_SECONDS``."""
    from linfusion.app.timing import ANNOUNCE_SECONDS, predicted_seconds

    pipe = tiny_pipeline("sd15")
    params = GenerationParams("a red circle", width=64, height=64, steps=4, seed=1)
    run = prepare(params, pipe, Budgets(8 * 2**30))
    assert run.memory.flops > 0
    real = predicted_seconds(run.memory.flops, torch.device("cpu"), torch.float32)
    assert real is not None and 0 < real < ANNOUNCE_SECONDS  # a tiny model: seconds at most
    loaded = SimpleNamespace(pipe=pipe, device=torch.device("cpu"))
    for seconds, announced in ((ANNOUNCE_SECONDS * 2, True), (ANNOUNCE_SECONDS / 2, False)):
        monkeypatch.setattr(app_run, "predicted_seconds", lambda flops, device, dtype, s=seconds: s)
        app_run.announce(run, loaded)
        err = capsys.readouterr().err
        assert "memory plan for cpu" in err
        assert ("predicted: about 2.0 min" in err) == announced, err
        if announced:
            assert f"{run.memory.flops:.2g} FLOPs" in err
