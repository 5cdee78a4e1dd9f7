"""What the page reads back from the browser's storage: only values its fields can hold."""

from __future__ import annotations

import json

import gradio as gr
import pytest

from linfusion.ui.remembered import MAX_TEXT, kept_values, restored_values


@pytest.fixture
def fields() -> dict:
    with gr.Blocks():
        return {
            "prompt": gr.Textbox(),
            "width": gr.Number(32, precision=0),
            "guidance": gr.Number(7.5),
            "linfusion": gr.Checkbox(True),
            "mode": gr.Radio([("plain", "plain"), ("SDEdit chain", "sdedit")], value="plain"),
            "preset": gr.Dropdown([("custom", -1), ("native", 0), ("512", 512)], value=0),
            "model": gr.Dropdown(["bundled"], value="bundled"),
        }


def test_values_the_fields_can_hold_are_read_back(fields: dict) -> None:
    stored = {"prompt": "a cat", "width": 64, "guidance": 4.5, "linfusion": False, "mode": "sdedit",
              "preset": -1, "model": "bundled", "unknown": 1}  # fmt: skip
    assert kept_values(fields, json.dumps(stored)) == {k: v for k, v in stored.items() if k != "unknown"}
    assert kept_values(fields, json.dumps({"width": 64.0, "guidance": 5})) == {"width": 64, "guidance": 5}
    assert type(kept_values(fields, '{"width": 64.0}')["width"]) is int  # as the whole-number field holds it


@pytest.mark.parametrize(
    "stored",
    [
        {"prompt": "x" * (MAX_TEXT + 1)},
        {"prompt": 3},  # a number is no text
        {"width": "abc"},
        {"width": True},  # a bool is no number
        {"width": 40.5},  # the field holds whole numbers
        {"width": None},
        {"guidance": float("nan")},
        {"linfusion": "yes"},
        {"mode": "SDEdit chain"},  # the label, not the value
        {"preset": "512"},  # a text that reads like the value
        {"preset": 1024},  # no longer offered
        {"model": "gone/model"},  # a model this server was not started with
        {"model": "/etc/passwd"},
    ],
)
def test_a_value_the_field_cannot_hold_is_dropped(fields: dict, stored: dict) -> None:
    assert kept_values(fields, json.dumps(stored)) == {}


@pytest.mark.parametrize("text", [None, "", "not JSON {", "[1, 2]", '"a cat"', "null"])
def test_storage_that_is_no_object_gives_nothing(fields: dict, text: str | None) -> None:
    assert kept_values(fields, text) == {}


def test_restoring_lets_the_page_settle_what_depends_on_the_kept_values(fields: dict) -> None:
    def settle(values: dict) -> dict:  # as the page does: the preset reads custom off its size
        return {**values, "preset": values["preset"] if values["width"] == 32 else -1}

    assert restored_values(fields, json.dumps({"width": 48, "prompt": "a cat"}), settle) == {
        "width": 48,
        "prompt": "a cat",
        "preset": -1,  # not stored, but no longer the default's reading
    }
    assert restored_values(fields, json.dumps({"width": 32, "preset": 512}), settle) == {
        "width": 32,
        "preset": 512,
    }
    assert restored_values(fields, json.dumps({"width": "abc"}), settle) == {}  # nothing kept: nothing set
    assert restored_values(fields, json.dumps({"mode": "sdedit"})) == {"mode": "sdedit"}
