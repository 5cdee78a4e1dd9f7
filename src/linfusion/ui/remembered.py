"""The page's settings kept in the browser (localStorage), so that a reload or a restart of the server keeps them.

Saving happens in the page only (no request to the server, so it can never race the page's own handlers):
whenever a kept field changes, the fields that differ from their defaults are written under
:data:`STORAGE_KEY`; when none differs the entry is removed. The page's load reads the entry once and the
server checks it field by field (:func:`kept_values`): a value the field cannot hold (a sampler or a
model this server does not offer, steps "abc") is dropped and the field keeps its default. **Reset to
defaults** puts a tab's fields back as the page starts, which leaves nothing of them stored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import gradio as gr

STORAGE_KEY = "linfusion-settings"
MAX_TEXT = 20_000  # characters of a kept text field; a longer stored value is dropped
QUIET = {"show_progress": "hidden", "concurrency_limit": None}

Fields = Mapping[str, gr.components.Component]
Settle = Callable[[dict[str, Any]], dict[str, Any]]


def default_of(component: gr.components.Component) -> Any:
    """A field's value as the page starts (an empty text box is "", as the browser holds it)."""
    if component.value is None and isinstance(component, gr.Textbox):
        return ""
    return component.value


def _choices(component: gr.components.Component) -> list[Any]:
    return [choice[1] if isinstance(choice, tuple) else choice for choice in component.choices]


def accepted(component: gr.components.Component, value: Any) -> Any | None:
    """``value`` as ``component`` holds it, or None when the field cannot hold it."""
    if isinstance(component, gr.Checkbox):
        return value if isinstance(value, bool) else None
    if isinstance(component, gr.Number):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
        if component.precision == 0:
            return int(value) if value == int(value) else None
        return value
    if isinstance(component, gr.Radio | gr.Dropdown):
        matches = [
            choice for choice in _choices(component) if choice == value and type(choice) is type(value)
        ]
        return matches[0] if matches else None
    if isinstance(component, gr.Textbox):
        return value if isinstance(value, str) and len(value) <= MAX_TEXT else None
    return None


def kept_values(fields: Fields, stored: str | None) -> dict[str, Any]:
    """The values of the stored JSON object that the fields can hold, by field name; anything else is left
    out (an unknown name, a value of the wrong kind, a choice this server does not offer, broken JSON)."""
    try:
        decoded = json.loads(stored or "{}")
    except ValueError:
        return {}
    if not isinstance(decoded, dict):
        return {}
    kept = {}
    for name, component in fields.items():
        value = accepted(component, decoded[name]) if name in decoded else None
        if value is not None:
            kept[name] = value
    return kept


def restored_values(fields: Fields, stored: str | None, settle: Settle | None = None) -> dict[str, Any]:
    """What the page's load puts back, by field name: the kept values, and whatever ``settle`` (given every
    field's value, kept or default) changes to keep the fields consistent (e.g. a size preset that no
    longer matches the kept width and height)."""
    kept = kept_values(fields, stored)
    if not kept:
        return {}
    defaults = {name: default_of(component) for name, component in fields.items()}
    settled = (settle or dict)({**defaults, **kept})
    return {name: settled[name] for name in fields if name in kept or settled[name] != defaults[name]}


# Runs in the page on every change of a kept field, with every kept field's value (no server request).
SAVE_SCRIPT = """(...values) => {
  if (!window.linfusionSettingsRead) return [];  // what was stored is not read yet: keep it
  const names = @NAMES@, defaults = @DEFAULTS@, changed = {};
  const same = (a, b) => JSON.stringify(a ?? "") === JSON.stringify(b ?? "");
  names.forEach((name, i) => { if (!same(values[i], defaults[i])) changed[name] = values[i]; });
  try {
    if (Object.keys(changed).length) localStorage.setItem(@KEY@, JSON.stringify(changed));
    else localStorage.removeItem(@KEY@);
  } catch (error) {}  // storage refused (full, blocked): the page works without it
  return [];
}"""
# Runs in the page on load: hands what is stored to the server's check, and allows saving from then on.
READ_SCRIPT = """(stored) => {
  window.linfusionSettingsRead = true;
  try { return [localStorage.getItem(@KEY@) || ""]; } catch (error) { return [""]; }
}""".replace("@KEY@", json.dumps(STORAGE_KEY))


def save_script(fields: Fields) -> str:
    """:data:`SAVE_SCRIPT` for ``fields`` (its arguments are their values, in this order)."""
    defaults = [default_of(component) for component in fields.values()]
    return (
        SAVE_SCRIPT.replace("@NAMES@", json.dumps(list(fields)))
        .replace("@DEFAULTS@", json.dumps(defaults))
        .replace("@KEY@", json.dumps(STORAGE_KEY))
    )


def wire_remembered(page: gr.Blocks, fields: Fields, settle: Settle | None = None) -> None:
    """Keep ``fields`` (by a name that stays the same across versions) in the browser, restored on load."""
    components = list(fields.values())
    stored = gr.Textbox(visible=False)  # what the page read from its storage, on its way to the server

    def restore(text: str | None) -> dict:
        restored = restored_values(fields, text, settle)  # a field left alone is skipped, never set again
        return {component: restored.get(name, gr.skip()) for name, component in fields.items()}

    page.load(restore, stored, components, js=READ_SCRIPT, **QUIET)
    gr.on([component.change for component in components], None, components, None, js=save_script(fields),
          **QUIET)  # fmt: skip


def wire_reset(button: gr.Button, fields: Fields) -> None:
    """``button`` puts ``fields`` back as the page starts (their stored values go with the next save)."""
    defaults = {component: default_of(component) for component in fields.values()}
    button.click(lambda: defaults, None, list(defaults), **QUIET)
