"""The page's queue: its jobs, running or waiting, each with its own Cancel button.

The list is plain HTML (:func:`queue_html`) that the tabs' job watchers refresh when it changes (a job
starts, ends or moves up), never on a progress step. Its buttons carry the job's number; a click hands
that number to one fixed event (:data:`QUEUE_SCRIPT`), so a button never points at a handler that a
newer list replaced.
"""

from __future__ import annotations

import html
from collections.abc import Callable

import gradio as gr

from .jobs import WAITING, JobRunner

# A click on a job's Cancel: its number goes where the fixed cancel event reads it, and that event runs.
QUEUE_SCRIPT = """<script>(() => {
document.addEventListener("click", (event) => {
  const button = event.target instanceof Element && event.target.closest("#queue button[data-job]");
  if (!button) return;
  window.linfusionCancelJob = Number(button.dataset.job);
  document.getElementById("queue-cancel")?.click();
}, true);
})();</script>"""
QUEUE_CSS = """
#queue-cancel { display: none !important; }
#queue .queue-row { display: flex; align-items: center; gap: 0.75em; margin: 0.2em 0; }
#queue .queue-row button { padding: 0.1em 0.8em; border-radius: 0.4em; color: var(--button-cancel-text-color, #fff);
  background: var(--button-cancel-background-fill, #ef4444); }
"""


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


def queue_html(entries: list[list]) -> str:
    """The list as the page shows it (the titles escaped: an upload's name is the user's text)."""
    if not entries:
        return "<p><strong>Your jobs</strong>: none</p>"
    rows = "".join(
        f'<div class="queue-row"><span>{html.escape(text)}</span>'
        f'<button type="button" data-job="{int(job_id)}">Cancel</button></div>'
        for job_id, text in entries
    )
    return f"<p><strong>Your jobs</strong> ({len(entries)})</p>{rows}"


def wire_queue(runner: JobRunner, session_of: Callable[[gr.Request | None], str]) -> gr.HTML:
    """The queue panel under the page's tabs; returns it for the job watchers to keep up to date."""
    panel = gr.HTML(queue_html([]), elem_id="queue")
    job_number = gr.Number(0, visible=False)  # set in the page by the click (QUEUE_SCRIPT)
    cancel = gr.Button("Cancel this job", elem_id="queue-cancel")

    def cancel_one(job_id: float, request: gr.Request) -> str:
        owner = session_of(request)
        if not runner.cancel(owner, int(job_id or 0)):
            gr.Info("That job has already ended.")
        return queue_html(queue_entries(runner, owner))

    cancel.click(cancel_one, job_number, panel, js="() => [window.linfusionCancelJob || 0]",
                 show_progress="hidden", concurrency_limit=None)  # fmt: skip
    return panel
