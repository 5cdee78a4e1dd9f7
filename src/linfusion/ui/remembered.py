"""Fields of the page kept in the browser (localStorage), so that a reload or a restart keeps a user's settings.

Every change of a kept field writes them all; the page's load reads them back. What comes back from the
browser is checked field by field (a value the field could not hold is dropped, the field keeps its default),
and **Reset to defaults** puts every field back as the page starts and forgets what was kept.
"""

from __future__ import annotations

import math
from typing import Any

import gradio as gr

MAX_TEXT = 20_000  # characters of a kept text field; a longer stored value is dropped
# Gradio encrypts a BrowserState with this key. What it stores is the page's own fields, in the user's
# own browser: a fixed key keeps them across restarts of the server (a random one would lose them).
STORAGE_SECRET = "linfusion-ui-fields"


def _choices(component: gr.components.Component) -> list[Any]:
    return [choice[1] if isinstance(choice, tuple) else choice for choice in component.choices]


def accepted(component: gr.components.Component, value: Any) -> bool:
    """Whether ``value``, read back from the browser, is one that ``component`` can hold."""
    if isinstance(component, gr.Checkbox):
        return isinstance(value, bool)
    if isinstance(component, gr.Number):
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(component, gr.Radio | gr.Dropdown):
        return isinstance(value, str | int) and value in _choices(component)
    if isinstance(component, gr.Textbox):
        return isinstance(value, str) and len(value) <= MAX_TEXT
    return False


def kept_values(fields: dict[str, gr.components.Component], stored: Any) -> dict[str, Any]:
    """The stored values the fields can hold, by field name; anything else is left out."""
    if not isinstance(stored, dict):
        return {}
    return {
        name: stored[name]
        for name, component in fields.items()
        if name in stored and accepted(component, stored[name])
    }


def wire_remembered(
    page: gr.Blocks, fields: dict[str, gr.components.Component], reset: gr.Button, storage_key: str
) -> None:
    """Keep ``fields`` (by name) in the browser under ``storage_key``; ``reset`` restores their defaults."""
    store = gr.BrowserState({}, storage_key=storage_key, secret=STORAGE_SECRET)
    components = list(fields.values())
    defaults = {component: component.value for component in components}
    quiet = {"show_progress": "hidden", "concurrency_limit": None}

    def restore(stored: Any) -> dict:
        kept = kept_values(fields, stored)
        return {fields[name]: value for name, value in kept.items()}

    def remember(*values: Any) -> dict[str, Any]:
        return dict(zip(fields, values))

    def reset_fields() -> dict:
        return {store: {}, **defaults}

    page.load(restore, store, components, **quiet)
    gr.on([component.change for component in components], remember, components, store, **quiet)
    reset.click(reset_fields, None, [store, *components], **quiet)
