"""The page's look and its own scripts, inline: accessible names, drops, keys, styles, the theme.

Everything here is sent with the page; nothing is fetched from the internet (no script, font or style).
"""

from __future__ import annotations

import json

import gradio as gr

from .queue_view import QUEUE_CSS, QUEUE_SCRIPT

# Accessible names Gradio does not give: a radio group's fieldset has no legend, an output image's block
# label is tied to nothing. Set by an inline script (nothing is fetched) that keeps them across re-renders.
ACCESSIBLE_NAMES = {
    f"{tab}-{name}": (role, label)
    for tab in ("t2i", "up")
    for name, role, label in (
        ("mode", "radiogroup", "Mode"),
        ("vae", "radiogroup", "VAE attention"),
        ("result", "region", "Result"),
        ("stages", "region", "Stages"),
        ("gallery", "region", "Images of this run"),
        ("status", "status", "Status"),
    )
}
# A PNG dropped anywhere on the Generate tab (not on an upload box, which takes its own drops) goes to the
# "restore its parameters" box, as if it had been dropped there.
DROP_SCRIPT = """<script>(() => {
const restoreInput = () => document.querySelector("#t2i-restore input[type=file]");
const onGenerateTab = (target) => target instanceof Element && target.closest("#tab-generate") &&
  !target.closest("[data-testid=file-upload], #t2i-restore, #up-file, .upload-container, button.center");
const isFileDrag = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
document.addEventListener("dragover", (event) => {
  if (isFileDrag(event) && onGenerateTab(event.target) && restoreInput()) event.preventDefault();
}, true);
document.addEventListener("drop", (event) => {
  const input = restoreInput();
  if (!isFileDrag(event) || !onGenerateTab(event.target) || !input || !event.dataTransfer.files.length) return;
  event.preventDefault(); event.stopPropagation();
  const transfer = new DataTransfer();
  transfer.items.add(event.dataTransfer.files[0]);
  input.files = transfer.files;
  input.dispatchEvent(new Event("change", {bubbles: true}));
}, true);
})();</script>"""
# Ctrl+Enter anywhere on a tab (Enter in one of its number fields) runs it, as in the common SD web UIs.
KEYS_SCRIPT = """<script>(() => {
document.addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || event.isComposing || !(event.target instanceof Element)) return;
  const tab = event.target.closest("#tab-generate, #tab-upscale");
  const number = event.target.matches("input[type=number]");
  if (!tab || !(event.ctrlKey || event.metaKey || number)) return;
  event.preventDefault(); event.stopPropagation();
  document.getElementById(tab.id === "tab-generate" ? "t2i-generate" : "up-run")?.click();
}, true);
})();</script>"""
HEAD = (
    "<script>(() => {const names = "
    + json.dumps({key: list(value) for key, value in ACCESSIBLE_NAMES.items()})
    + """;
const apply = () => { for (const [id, [role, name]] of Object.entries(names)) {
  const element = document.getElementById(id);
  if (element && element.getAttribute("aria-label") !== name) {
    element.setAttribute("role", role); element.setAttribute("aria-label", name);
    if (role === "status") element.setAttribute("aria-live", "polite");
  }
  if (element && role === "status") {
    element.classList.toggle("error-line", element.textContent.trim().startsWith("Error"));
  } }
  for (const image of document.querySelectorAll(".pixel-view img")) {
    if (!image.dataset.linfusionSized) {
      image.dataset.linfusionSized = "1";
      image.addEventListener("load", () => { image.dataset.linfusionSized = ""; apply(); });
    }
    const small = image.naturalWidth > 0 && image.naturalWidth < image.clientWidth;
    const rendering = small ? "pixelated" : "auto";
    if (image.style.imageRendering !== rendering) image.style.imageRendering = rendering;
  } };
new MutationObserver(apply).observe(document.documentElement,
  {childList: true, subtree: true, characterData: true, attributes: true, attributeFilter: ["src"]});
})();</script>"""
    + DROP_SCRIPT
    + KEYS_SCRIPT
    + QUEUE_SCRIPT
)
CSS = (
    """
#t2i-status, #up-status { min-height: 2.5em; }
.plan textarea { font-family: ui-monospace, monospace; font-size: 0.85em; }
#t2i-result img, #up-result img { width: 100%; height: 100%; object-fit: contain; }
#t2i-preset .options[style*="bottom"], #t2i-ratio .options[style*="bottom"] {
  margin-bottom: 3.4rem; max-height: calc(50vh - 4rem) !important; }
.error-line, .error-line * { color: var(--error-text-color, #b91c1c) !important; }
"""
    + QUEUE_CSS
)


def theme() -> gr.themes.Base:
    """Gradio's default look with the system's own fonts: the page fetches nothing from the internet."""
    return gr.themes.Default(
        font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "monospace")
    )
