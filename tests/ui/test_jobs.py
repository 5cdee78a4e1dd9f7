"""The web UI's job queue: one job at a time, in order, places in the queue, cancelling, surviving errors."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from linfusion.errors import UserError
from linfusion.ui.jobs import (
    CANCELLED,
    DONE,
    FAILED,
    FINISHED,
    RUNNING,
    WAITING,
    JobRunner,
    QueueFull,
    StageWork,
)
from linfusion.ui.queue_view import queue_entries


def wait_until_finished(runner: JobRunner, job, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while job.state not in FINISHED:
        assert time.monotonic() < deadline, f"job {job.label} still {job.state}"
        runner.wait(job, job.version, 0.2)


@pytest.fixture
def runner():
    runner = JobRunner(max_waiting=3)
    yield runner
    runner.close()


def test_jobs_run_one_at_a_time_in_submission_order(runner: JobRunner) -> None:
    log: list[tuple[str, str]] = []
    running = [0]
    overlap = []

    def work(name: str):
        def run(job):
            running[0] += 1
            overlap.append(running[0])
            log.append(("start", name))
            time.sleep(0.05)
            log.append(("end", name))
            running[0] -= 1
            return name

        return run

    jobs = [runner.submit("page", name, work(name)) for name in ("a", "b", "c")]
    for job in jobs:
        wait_until_finished(runner, job)
    assert [job.result for job in jobs] == ["a", "b", "c"]
    assert log == [(edge, name) for name in "abc" for edge in ("start", "end")]
    assert max(overlap) == 1


def test_places_in_the_queue_and_cancelling_a_waiting_job(runner: JobRunner) -> None:
    release = threading.Event()
    first = runner.submit("one", "first", lambda job: release.wait(5))
    while first.state != RUNNING:
        runner.wait(first, first.version, 0.1)
    second = runner.submit("two", "second", lambda job: "second")
    third = runner.submit("three", "third", lambda job: "third")
    assert (runner.position(first), runner.position(second), runner.position(third)) == (0, 1, 2)
    assert (runner.ahead(second), runner.ahead(third)) == (1, 2)
    assert runner.cancel("two") == 1
    assert second.state == CANCELLED and second.started is None
    assert runner.position(third) == 1 and runner.ahead(third) == 1
    release.set()
    wait_until_finished(runner, third)
    assert (first.state, third.state, third.result) == (DONE, DONE, "third")


def test_cancel_stops_a_running_job_at_its_next_step(runner: JobRunner) -> None:
    steps_done = []

    def long_job(job):
        job.plan([StageWork(64, 64, 1000)])
        for step in range(1, 1001):
            time.sleep(0.01)
            steps_done.append(step)
            job.step_done(0, step)
        return "finished"

    job = runner.submit("page", "long", long_job)
    while len(steps_done) < 3:
        time.sleep(0.01)
    asked = time.monotonic()
    assert runner.cancel("page") == 1
    wait_until_finished(runner, job)
    assert job.state == CANCELLED and job.result is None
    assert job.ended - asked < 0.5  # one step of 10 ms, with room for a busy machine
    assert len(steps_done) < 1000
    after = runner.submit("page", "next", lambda job: "next")  # the worker is free again
    wait_until_finished(runner, after)
    assert after.result == "next"


def test_a_failing_job_reports_and_the_next_one_runs(runner: JobRunner) -> None:
    def refuse(job):
        raise UserError("width 33 is not a positive multiple of 8")

    def crash(job):
        raise RuntimeError("boom")

    refused = runner.submit("page", "refused", refuse)
    crashed = runner.submit("page", "crashed", crash)
    fine = runner.submit("page", "fine", lambda job: 42)
    for job in (refused, crashed, fine):
        wait_until_finished(runner, job)
    assert (refused.state, refused.error) == (FAILED, "width 33 is not a positive multiple of 8")
    assert crashed.state == FAILED and crashed.error.startswith("internal error (RuntimeError): boom;")
    assert (fine.state, fine.result) == (DONE, 42)


def test_a_full_disk_is_one_line_naming_the_file_not_an_internal_error(runner: JobRunner, tmp_path) -> None:
    target = tmp_path / "outputs" / "00001-7.png"

    def write(job):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    job = runner.submit("page", "full", write)
    wait_until_finished(runner, job)
    assert job.state == FAILED
    assert job.error.startswith(f"cannot write {target} (No space left on device, ")
    assert (
        job.error.endswith("free some space there or write to another disk") and "internal" not in job.error
    )


def test_a_full_queue_refuses_with_a_message(runner: JobRunner) -> None:
    release = threading.Event()
    blocker = runner.submit("page", "blocker", lambda job: release.wait(5))
    while blocker.state != RUNNING:
        runner.wait(blocker, blocker.version, 0.1)
    waiting = [runner.submit("page", f"w{i}", lambda job: None) for i in range(3)]
    with pytest.raises(QueueFull, match="the queue is full"):
        runner.submit("page", "one too many", lambda job: None)
    assert all(job.state == WAITING for job in waiting)
    release.set()


def test_remaining_time_comes_from_the_work_done_so_far() -> None:
    from linfusion.ui.jobs import Job

    job = Job(1, "page", "chain", lambda job: None)
    job.plan([StageWork(32, 32, 10), StageWork(64, 64, 5)])  # work: 10 240 + 20 480 pixel-steps
    job.started, job.work_started = 90.0, 100.0  # 10 s of planning before the first step
    assert job.remaining(now=100.0) is None  # nothing done yet: no estimate
    job.step_done(0, 10)
    job.stage_done(0, image=None, caption="stage 1")
    assert (job.stage, job.step, job.stage_steps) == (1, 0, 5)
    assert job.remaining(now=110.0) == pytest.approx(20.0)  # a third done in 10 s: 20 s left


def test_one_job_is_cancelled_by_its_number_and_only_by_its_owner(runner: JobRunner) -> None:
    release = threading.Event()

    def blocking(job):
        while not release.wait(0.02):
            job.check_cancelled()

    first = runner.submit("me", "generate", blocking, "Generate 64x64, seed 1")
    while first.state != RUNNING:
        runner.wait(first, first.version, 0.1)
    second = runner.submit("me", "upscale", lambda job: "second", "Upscale a.png x2, seed 2")
    third = runner.submit("me", "generate", lambda job: "third", "Generate 32x32, seed 3")
    assert runner.owned("me") == [first, second, third]
    assert queue_entries(runner, "me") == [
        [first.id, "Generate 64x64, seed 1 (running)"],
        [second.id, "Upscale a.png x2, seed 2 (waiting, 1st in the queue)"],
        [third.id, "Generate 32x32, seed 3 (waiting, 2nd in the queue)"],
    ]
    assert runner.cancel("someone else", second.id) == 0  # another page cannot cancel it
    assert runner.cancel("me", second.id) == 1
    assert second.state == CANCELLED and third.state == WAITING and not first.cancel_requested
    assert runner.cancel("me", first.id) == 1
    wait_until_finished(runner, first)
    wait_until_finished(runner, third)
    assert (first.state, third.state, third.result) == (CANCELLED, DONE, "third")
    assert runner.owned("me") == [] and queue_entries(runner, "me") == []
    release.set()
