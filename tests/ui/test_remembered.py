"""What the page reads back from the browser's storage: only values its fields can hold."""

from __future__ import annotations

import gradio as gr

from linfusion.ui.remembered import MAX_TEXT, kept_values


def test_only_values_the_fields_can_hold_are_read_back() -> None:
    with gr.Blocks():
        fields = {
            "prompt": gr.Textbox(),
            "width": gr.Number(32, precision=0),
            "linfusion": gr.Checkbox(True),
            "mode": gr.Radio([("plain", "plain"), ("SDEdit chain", "sdedit")], value="plain"),
            "model": gr.Dropdown(["bundled"], value="bundled"),
        }
    stored = {"prompt": "a cat", "width": 64, "linfusion": False, "mode": "sdedit", "model": "bundled",
              "unknown": 1}  # fmt: skip
    assert kept_values(fields, stored) == {k: v for k, v in stored.items() if k != "unknown"}
    hostile = {"prompt": "x" * (MAX_TEXT + 1), "width": float("nan"), "linfusion": "yes", "mode": "SDEdit chain",
               "model": "/etc/passwd"}  # fmt: skip
    assert kept_values(fields, hostile) == {}
    assert kept_values(fields, {"width": True, "prompt": 3}) == {}  # a bool is no number, a number no text
    assert kept_values(fields, ["a cat"]) == {}
    assert kept_values(fields, None) == {}
