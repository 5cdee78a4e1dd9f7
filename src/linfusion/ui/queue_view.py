"""The page's queue: its jobs, running or waiting, each with its own Cancel button.

The list is a plain value (:func:`queue_entries`) kept in a ``gr.State`` that the tabs' job watchers
refresh; the buttons are rendered again only when that value changes (a job starts, ends or moves up),
never on a progress step.
"""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from .jobs import WAITING, JobRunner


def ordinal(number: int) -> str:
    """1st, 2nd, 3rd, 4th ... 11th, 12th, 13th ... 21st."""
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def queue_entries(runner: JobRunner, owner: str) -> list[list]:
    """``[job id, description]`` for each unfinished job of ``owner``, the running one first."""
    entries = []
    with runner.lock:  # one consistent reading of states and places
        for job in runner.owned(owner):
            title = job.title or job.label
            if job.state == WAITING:
                where = f"waiting, {ordinal(runner.position(job) or 1)} in the queue"
            elif job.cancel_requested:
                where = "cancelling"
            else:
                where = "running"
            entries.append([job.id, f"{title} ({where})"])
    return entries


def wire_queue(runner: JobRunner, session_of: Callable[[gr.Request | None], str]) -> gr.State:
    """The queue panel under the page's tabs; returns the state that the job watchers keep up to date."""
    entries = gr.State([])
    quiet = {"show_progress": "hidden", "concurrency_limit": None}

    @gr.render(inputs=entries)
    def show(current: list[list]) -> None:
        with gr.Column(elem_id="queue"):
            gr.Markdown(
                f"**Your jobs** ({len(current)})" if current else "**Your jobs**: none", elem_id="queue-title"
            )
            for job_id, text in current:
                with gr.Row(equal_height=True, elem_classes="queue-row"):
                    gr.Markdown(text, elem_classes="queue-job")
                    cancel = gr.Button("Cancel", size="sm", variant="stop", scale=0, min_width=90,
                                       elem_classes="queue-cancel")  # fmt: skip

                    def cancel_one(request: gr.Request, job_id: int = job_id) -> list[list]:
                        owner = session_of(request)
                        if not runner.cancel(owner, job_id):
                            gr.Info("That job has already ended.")
                        return queue_entries(runner, owner)

                    cancel.click(cancel_one, None, entries, **quiet)

    return entries
