"""One device, one job at a time: a first-in first-out queue served by a single worker thread.

The page submits a job and then watches it (its place in the queue, its stage and step, the images of
finished stages) until it ends. Cancelling is cooperative: a waiting job leaves the queue at once, a
running one stops at its next step boundary, where the work calls :meth:`Job.step`. A job that raises a
:class:`~linfusion.errors.UserError` fails with its message; anything else is a bug, logged with its
traceback and shown as an "internal error" line. Nothing here knows about torch or Gradio, so the queue is
tested on its own.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..io import disk_full_message, is_disk_full

logger = logging.getLogger(__name__)

WAITING, RUNNING, DONE, FAILED, CANCELLED = "waiting", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


class JobCancelled(Exception):
    """Raised inside the work at a step boundary once the job was cancelled."""


INTERNAL_ERROR = "internal error ({kind}): {error}; the server's log has the traceback"


class QueueFull(UserError):
    """Too many jobs wait already; the page says to try again later."""


class ShuttingDown(UserError):
    """The server is stopping and takes no new job."""


@dataclass
class StageWork:
    """One stage as the progress display counts it: its size (pixels) and its denoising steps."""

    width: int
    height: int
    steps: int

    @property
    def work(self) -> float:
        return float(self.width * self.height * self.steps)


@dataclass
class Job:
    """A unit of device work and everything the page shows about it while it waits, runs and ends."""

    id: int
    owner: str
    label: str
    work: Callable[[Job], Any]
    title: str = ""  # what the page's queue calls it, e.g. "Generate 64x64, seed 7"
    state: str = WAITING
    result: Any = None
    error: str | None = None
    stages: list[StageWork] = field(default_factory=list)
    stage: int = 0  # 0-based index of the stage running now
    step: int = 0  # steps finished in that stage
    stage_steps: int = 0  # steps of that stage (the pipeline's own count once it runs)
    stage_images: list[tuple[Any, str]] = field(default_factory=list)
    preview: Any = None  # the image as it denoises (a cheap preview), None before the first step
    note: str = ""  # what the job does before its first step (planning the memory...)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    work_started: float | None = None  # the first step's start (after the plan): the pace of the steps
    ended: float | None = None
    version: int = 0  # bumped on every change, so watchers wake only when there is news
    _cancel: threading.Event = field(default_factory=threading.Event)
    _runner: JobRunner | None = None

    # ------------------------------------------------------------------ called by the work
    def plan(self, stages: list[StageWork]) -> None:
        """The stages this job will run, before the first step (for 'stage i of n' and the time left)."""
        with self._lock():
            self.stages = list(stages)
            self.work_started = time.monotonic()
            self.stage, self.step = 0, 0
            self.stage_steps = stages[0].steps if stages else 0
            self._changed()

    def set_note(self, note: str) -> None:
        with self._lock():
            self.note = note
            self._changed()

    def step_done(self, stage: int, step: int, steps: int | None = None) -> None:
        """A denoising step finished; raises :class:`JobCancelled` when the job was cancelled meanwhile."""
        with self._lock():
            self.stage, self.step = stage, step
            if steps is not None:
                self.stage_steps = steps
            self._changed()
        self.check_cancelled()

    def show_preview(self, image: Any) -> None:
        with self._lock():
            self.preview = image
            self._changed()

    def stage_done(self, stage: int, image: Any, caption: str) -> None:
        with self._lock():
            self.stage_images.append((image, caption))
            if stage + 1 < len(self.stages):
                self.stage, self.step = stage + 1, 0
                self.stage_steps = self.stages[stage + 1].steps
            self._changed()
        self.check_cancelled()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled(self.label)

    # ------------------------------------------------------------------ read by the page
    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def elapsed(self, now: float | None = None) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or now or time.monotonic()) - self.started

    def fraction_done(self) -> float:
        """The share of the job's work (pixels x steps over its stages) done so far, 0 to 1."""
        total = sum(stage.work for stage in self.stages)
        if not total:
            return 0.0
        done = sum(stage.work for stage in self.stages[: self.stage])
        current = self.stages[min(self.stage, len(self.stages) - 1)]
        done += current.width * current.height * min(self.step, current.steps)
        return min(1.0, done / total)

    def remaining(self, now: float | None = None) -> float | None:
        """Seconds left, from the time per unit of work (pixels x steps) so far; None before any step."""
        if not self.stages or self.work_started is None:
            return None
        done = sum(stage.work for stage in self.stages[: self.stage])
        current = self.stages[min(self.stage, len(self.stages) - 1)]
        done += current.width * current.height * self.step
        total = sum(stage.work for stage in self.stages)
        if done <= 0:
            return None
        working = (self.ended or now or time.monotonic()) - self.work_started
        return max(0.0, working * (total - done) / done)

    def _lock(self) -> Any:
        return self._runner.lock if self._runner is not None else _NO_LOCK

    def _changed(self) -> None:
        self.version += 1
        if self._runner is not None:
            self._runner.changed.notify_all()


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NO_LOCK = _NoLock()


class JobRunner:
    """Runs submitted jobs one after the other on one worker thread, in submission order."""

    def __init__(self, max_waiting: int = 32) -> None:
        self.max_waiting = max_waiting
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._ids = itertools.count(1)
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="linfusion-ui-device", daemon=True)
        self._worker.start()

    def submit(self, owner: str, label: str, work: Callable[[Job], Any], title: str = "") -> Job:
        with self.lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the queue is full ({self.max_waiting} jobs waiting); try again later")
            job = Job(next(self._ids), owner, label, work, title, _runner=self)
            self._waiting.append(job)
            self.changed.notify_all()
            return job

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, 2 for the one after...; 0 while running; None once finished."""
        with self.lock:
            if job.state == RUNNING:
                return 0
            if job.state != WAITING:
                return None
            return self._waiting.index(job) + 1

    def ahead(self, job: Job) -> int:
        """Jobs that will run before this one (the running job included)."""
        with self.lock:
            position = self.position(job)
            if not position:
                return 0
            return position - 1 + (1 if self._running is not None else 0)

    def pending(self, owner: str, label: str) -> list[Job]:
        """The unfinished jobs of ``owner`` with ``label`` (the running one first, then the queue's order)."""
        with self.lock:
            jobs = [self._running] if self._running is not None else []
            jobs += self._waiting
            return [job for job in jobs if job.owner == owner and job.label == label]

    def owned(self, owner: str) -> list[Job]:
        """The unfinished jobs of ``owner`` whatever their label (the running one first, then the queue's order)."""
        with self.lock:
            jobs = [self._running] if self._running is not None else []
            return [job for job in [*jobs, *self._waiting] if job.owner == owner]

    def cancel(self, owner: str, job_id: int | None = None) -> int:
        """Cancel the jobs of ``owner`` (only the one numbered ``job_id`` when given): waiting ones leave the
        queue, a running one stops at its next step. The number cancelled."""
        count = 0
        with self.lock:
            for job in self.owned(owner):
                if job_id is not None and job.id != job_id:
                    continue
                if job is self._running:
                    job._cancel.set()
                    job._changed()
                else:
                    self._waiting.remove(job)
                    job._cancel.set()
                    self._finish(job, CANCELLED)
                count += 1
        return count

    def wait(self, job: Job, seen_version: int, timeout: float) -> None:
        """Block until ``job`` changes after ``seen_version`` (or any job ahead moves), or ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while job.version == seen_version and job.state not in FINISHED:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.changed.wait(left)
                if job.state == WAITING:
                    return  # the queue moved: the place in it may have changed

    def close(self) -> None:
        with self.lock:
            self._closed = True
            for job in list(self._waiting):
                job._cancel.set()
                self._finish(job, CANCELLED)
            self._waiting.clear()
            if self._running is not None:
                self._running._cancel.set()
            self.changed.notify_all()

    # ------------------------------------------------------------------ the worker
    def _serve(self) -> None:
        while True:
            with self.lock:
                while not self._waiting and not self._closed:
                    self.changed.wait()
                if self._closed and not self._waiting:
                    return
                job = self._waiting.popleft()
                self._running = job
                job.state = RUNNING
                job.started = time.monotonic()
                job._changed()
            try:
                job.check_cancelled()
                result = job.work(job)
            except JobCancelled:
                self._end(job, CANCELLED)
            except UserError as error:
                self._end(job, FAILED, str(error))
            except Exception as error:  # the worker survives anything
                if is_disk_full(error):  # the user's to fix: one line saying what and where
                    self._end(job, FAILED, disk_full_message(error))
                else:  # a bug: logged with its traceback
                    logger.exception("job %s (%s) failed", job.id, job.label)
                    self._end(job, FAILED, INTERNAL_ERROR.format(kind=type(error).__name__, error=error))
            else:
                self._end(job, DONE, result=result)

    def _end(self, job: Job, state: str, error: str | None = None, result: Any = None) -> None:
        with self.lock:
            job.result, job.error = result, error
            self._finish(job, state)
            self._running = None
            self.changed.notify_all()

    def _finish(self, job: Job, state: str) -> None:
        job.state = state
        job.ended = time.monotonic()
        job._changed()
