"""The page's own logic, without a browser: size presets and the status line's words."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from linfusion.ui.jobs import RUNNING, Job, JobRunner, StageWork
from linfusion.ui.outputs import Result
from linfusion.ui.page import CUSTOM, mode_hint, preset_reading, size_for, status_line


@pytest.mark.parametrize(
    ("long_side", "ratio", "size"),
    [(3840, "16:9", (3840, 2160)), (16384, "9:16", (9216, 16384)), (2048, "1:1", (2048, 2048)),
     (1024, "21:9", (1024, 440)), (32, "3:2", (32, 24)), (768, "2:3", (512, 768))],
)  # fmt: skip
def test_presets_keep_the_long_side_and_round_the_other_to_8(long_side: int, ratio: str, size: tuple) -> None:
    assert size_for(long_side, ratio) == size
    assert all(side % 8 == 0 for side in size)


def test_the_size_preset_reads_custom_unless_width_and_height_are_what_it_gives() -> None:
    assert preset_reading(512, 512, 512, "1:1", native=32) == 512
    assert preset_reading(512, 384, 512, "4:3", native=32) == 512
    assert preset_reading(512, 512, 512, "4:3", native=32) == CUSTOM
    assert preset_reading(32, 32, 0, "1:1", native=32) == 0  # native: the model's own size
    assert preset_reading(64, 64, 0, "1:1", native=32) == CUSTOM
    assert preset_reading(512, 512, CUSTOM, "1:1", native=32) == CUSTOM  # custom stays custom
    assert preset_reading(512, 512, None, "1:1", native=32) == CUSTOM


def test_the_status_line_follows_a_job_from_the_queue_to_its_end() -> None:
    runner = JobRunner()
    release = threading.Event()
    try:
        blocker = runner.submit("other", "blocker", lambda job: release.wait(5))
        while blocker.state != RUNNING:
            runner.wait(blocker, blocker.version, 0.1)
        mine = runner.submit("me", "chain", lambda job: None)
        assert status_line(mine, runner) == "Waiting: 1st in the queue (1 job ahead of yours on the device)."
        assert status_line(blocker, runner) == "Starting..."
        blocker.set_note("Planning the memory: stage 2 of 3 (64x64)...")
        assert status_line(blocker, runner) == "Planning the memory: stage 2 of 3 (64x64)..."
        blocker.set_note("")
        blocker.plan([StageWork(32, 32, 10), StageWork(64, 64, 4)])
        blocker.step_done(0, 10, 10)
        blocker.stage_done(0, None, "1: 32x32")
        blocker.step_done(1, 2, 4)
        assert status_line(blocker, runner).startswith(
            "[##############......] 69% Stage 2 of 2 (64x64) · step 2 of 4 · "
        )  # 32x32x10 + 64x64x2 of 32x32x10 + 64x64x4 pixel-steps
        assert " elapsed · about " in status_line(blocker, runner) and status_line(blocker, runner).endswith(
            " left"
        )
        runner.cancel("other")
        assert status_line(blocker, runner) == "Cancelling: the job stops after the current step..."
    finally:
        release.set()
        runner.close()
    done = Job(3, "me", "done", lambda job: None, state="done")
    done.result = Result(Path("/out/00007-42.png"), "text", 42, 64, 48, 75.0)
    assert status_line(done, runner) == "Done in 1 min 15 s: 64x48, seed 42, saved as 00007-42.png."
    failed = Job(4, "me", "failed", lambda job: None, state="failed", error="width 33 is not a multiple of 8")
    assert status_line(failed, runner) == "Error: width 33 is not a multiple of 8"


def test_only_the_newest_plan_request_of_a_page_is_shown() -> None:
    from linfusion.ui.page import PlanOrder

    order = PlanOrder()
    assert order.offer("page", "t2i", 2)  # the second change reached the server first
    assert not order.offer("page", "t2i", 1)  # the first one arrives late: not planned at all
    assert order.newest("page", "t2i", 2)
    assert order.offer("page", "t2i", 3) and not order.newest("page", "t2i", 2)  # 2 stops tracing
    assert order.offer("other page", "t2i", 1) and order.offer("page", "up", 1)  # each page and tab apart


def test_a_batch_counts_its_seeds_up_or_draws_each_and_refuses_a_bad_count() -> None:
    from linfusion.errors import UserError
    from linfusion.ui.requests import batch_seeds

    assert batch_seeds(5, 3) == [5, 6, 7]
    assert batch_seeds(-1, 2.0) == [-1, -1]  # a random seed for each image
    for count, message in ((0, "batch count 0: enter a number from 1 to 16"), (None, "batch count is empty"),
                           (17, "batch count 17"), (1.5, "batch count must be a whole number")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            batch_seeds(1, count)


@pytest.mark.parametrize(
    ("mode", "width", "height", "warned"),
    [("plain", 64, 32, True), ("plain", 32, 40, True), ("plain", 32, 32, False), ("plain", 24, 16, False),
     ("sdedit", 4096, 4096, False), ("demofusion", 64, 64, False), ("plain", None, 64, False)],
)  # fmt: skip
def test_plain_mode_above_the_native_size_suggests_the_chains(mode: str, width, height, warned: bool) -> None:
    hint = mode_hint(mode, width, height, native=32)
    assert bool(hint) == warned
    if warned:
        assert "native 32 px" in hint and "SDEdit chain" in hint and f"{width}x{height}" in hint
