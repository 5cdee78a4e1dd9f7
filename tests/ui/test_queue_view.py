"""The queue panel's HTML: one row and one Cancel per job, names escaped."""

from __future__ import annotations

from linfusion.ui.queue_view import ordinal, queue_html


def test_each_job_gets_a_row_with_its_number_and_names_are_escaped() -> None:
    shown = queue_html(
        [[4, "Upscale <img src=x onerror=alert(1)>.png x2, seed 1 (running)"], [7, "Generate 64x64"]]
    )
    assert shown.count('class="queue-row"') == 2 and shown.count("<button") == 2
    assert 'data-job="4"' in shown and 'data-job="7"' in shown and "(2)" in shown
    assert "<img" not in shown and "&lt;img src=x onerror=alert(1)&gt;" in shown
    assert "none" in queue_html([]) and "<button" not in queue_html([])


def test_ordinals() -> None:
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th"
    ]  # fmt: skip
