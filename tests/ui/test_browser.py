"""``linfusion ui`` end to end: the real command on a free local port, driven in headless Chromium.

One server (bundled model, one torch thread) serves the whole module; each test opens its own page, so
each is a separate browser session. Every request any page makes is recorded, and a recording "proxy" on
a loopback port is given to the server (HTTP(S)_PROXY): the last test checks that the pages asked only
loopback addresses and that the server tried to reach none. (Chromium's own background traffic, which is
not the page's, is left out.) A missing Chromium or Playwright fails these tests; it never skips them.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from linfusion.app.checks import machine_memory
from linfusion.app.params import read_png_parameters
from linfusion.bundled import classifier
from linfusion.bundled.shapes import parse_caption
from support.browser import ConnectionRecorder, UiServer, find_chromium, running_ui

pytestmark = [pytest.mark.browser, pytest.mark.multiprocess, pytest.mark.slow]  # a server process, Chromium

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT_ENV = "LINFUSION_UI_SCREENSHOT"  # a path: the README screenshot is written there too
YELLOW = "a large yellow triangle in the center , on a black background"
RED = "a large red circle on the left , on a gray background"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
TIMEOUT_MS = 60_000  # generous: the machine running the tests may be busy
UPLOAD_CAP_MB = 1


def expect(locator):
    """Playwright's ``expect``, imported on use so that a missing Playwright fails in the fixture that says so."""
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=TIMEOUT_MS)
    return playwright_expect(locator)


@pytest.fixture(scope="module")
def recorder():
    recorder = ConnectionRecorder()
    yield recorder
    recorder.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, recorder: ConnectionRecorder):
    options = ["--threads", "1", "--max-upload-mb", str(UPLOAD_CAP_MB)]
    outputs, gradio_temp = tmp_path_factory.mktemp("ui-outputs"), tmp_path_factory.mktemp("gradio")
    with running_ui(outputs, gradio_temp, recorder.url, options) as running:
        yield running


REQUESTED_HOSTS: set[str] = set()  # every host any page of this module asked for


@pytest.fixture(scope="module")
def browser():
    chromium = find_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need Playwright: pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def new_page(browser, server: UiServer):
    """Opens the page in a fresh browser session, ready (the first plan is shown)."""
    contexts = []

    def open_page(width: int = 1400, height: int = 1000):
        context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        for event in ("request", "websocket"):  # everything the page loads, fetches or connects to
            page.on(event, lambda item: REQUESTED_HOSTS.add(urlsplit(item.url).hostname or item.url))
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.url)
        expect(page.locator("#t2i-plan textarea")).to_have_value(re.compile("^Fits"), timeout=TIMEOUT_MS)
        return page

    yield open_page
    for context in contexts:
        context.close()


# ---------------------------------------------------------------------- page helpers
def status_of(page, tab: str = "t2i"):
    return page.locator(f"#{tab}-status [data-testid='markdown']")


def expect_status(page, text: str | re.Pattern, tab: str = "t2i", timeout: int = TIMEOUT_MS) -> str:
    status = status_of(page, tab)
    expect(status).to_contain_text(text, timeout=timeout)
    return status.inner_text().strip()


def click_and_wait(page, button: str, tab: str = "t2i") -> str:
    """Click ``button``, wait until the tab's status line is a new final one, and return it."""
    status = status_of(page, tab)
    before = status.inner_text()
    page.get_by_role("button", name=button, exact=True).click()
    expect(status).not_to_have_text(before)
    return expect_status(page, re.compile("Done in|Error:|Cancelled"), tab)


def fill(page, **fields: object) -> None:
    """Type into the Generate tab's fields, found by their labels."""
    labels = {"prompt": "Prompt", "negative": "Negative prompt", "width": "Width", "height": "Height",
              "steps": "Steps", "guidance": "Guidance", "seed": "Seed"}  # fmt: skip
    scope = page.locator("#tab-generate")
    for name, value in fields.items():
        scope.get_by_label(labels[name], exact=True).fill(str(value))


def choose_mode(page, label: str, tab: str = "generate") -> None:
    page.locator(f"#tab-{tab}").get_by_role("radiogroup", name="Mode").get_by_label(label, exact=True).check()


def generate(page, **fields: object) -> str:
    fill(page, **fields)
    status = click_and_wait(page, "Generate")
    assert status.startswith("Done in"), status
    return status


def download_png(page, tab: str = "t2i") -> Path:
    with page.expect_download() as download:
        page.locator(f"#{tab}-download").click()
    return Path(download.value.path())


def saved_name(status: str) -> str:
    return re.search(r"saved as (\S+)\.$", status).group(1)


def drop_file(page, target: str, data: bytes, name: str, mime: str = "image/png") -> None:
    """A real drag and drop of a file onto ``target`` (dragenter, dragover, drop with a DataTransfer)."""
    transfer = page.evaluate_handle(
        """([encoded, name, mime]) => {
            const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: mime}));
            return transfer;
        }""",
        [base64.b64encode(data).decode(), name, mime],
    )
    zone = page.locator(target)
    for event in ("dragenter", "dragover", "drop"):
        zone.dispatch_event(event, {"dataTransfer": transfer})


def read_png_parameters_text(path: Path) -> str:
    with Image.open(path) as image:
        return image.info["parameters"]


def combobox(page, name: str):
    return page.locator("#tab-generate").get_by_role("combobox", name=name)


def reads_as(path: Path, caption: str) -> bool:
    """The bundled classifier finds the caption's shape, colour and background in the image."""
    with Image.open(path) as image:
        pixels = np.array(image.convert("RGB"))[None]
    score = classifier.score(pixels, [parse_caption(caption)])
    return score["found_shape"] == score["found_colour"] == score["background"] == 1.0


GAP_JS = """() => { window.statusTimes = []; window.previews = [];
const status = document.querySelector('#t2i-status'), result = document.querySelector('#t2i-result');
new MutationObserver(() => window.statusTimes.push([performance.now(), status.textContent.trim()]))
  .observe(status, {childList: true, subtree: true, characterData: true});
new MutationObserver(() => { const image = result.querySelector('img');
  if (image && status.textContent.includes('step')) window.previews.push(image.src); })
  .observe(result, {childList: true, subtree: true, attributes: true, attributeFilter: ['src']}); }"""


def status_gaps(page) -> list[float]:
    """Seconds between two status lines of the running job, as the page received them."""
    times = [t for t, text in page.evaluate("window.statusTimes") if "step" in text and "Stage" in text]
    return [(b - a) / 1000 for a, b in zip(times, times[1:])]


# ---------------------------------------------------------------------- tests
def test_generate_shows_the_result_and_downloads_a_png_that_follows_the_prompt(
    new_page, server: UiServer
) -> None:
    page = new_page()
    scope = page.locator("#tab-generate")
    for label in ("Prompt", "Negative prompt", "Width", "Height", "Steps", "Guidance", "Seed"):
        assert scope.get_by_label(label, exact=True).count() == 1, label
    assert scope.get_by_role("radiogroup", name="Mode").count() == 1
    assert scope.get_by_role("region", name="Result").count() == 1
    assert scope.get_by_role("button", name="Cancel", exact=True).count() == 1

    pictures = {}
    for caption, seed in ((YELLOW, 3), (RED, 4)):
        status = generate(page, prompt=caption, steps=20, guidance=4, seed=seed)
        assert "32x32" in status and f"seed {seed}" in status
        png = download_png(page)
        expect_text = f"{caption}\nSteps: 20, Sampler: ddim, CFG scale: 4.0, Size: 32x32, Seed: {seed}"
        with Image.open(png) as image:
            assert image.info["parameters"].startswith(expect_text)
        params = read_png_parameters(png)
        assert (params.prompt, params.mode, params.linfusion, params.model) == (
            caption,
            "plain",
            "auto",
            "bundled",
        )
        saved = server.outputs / saved_name(status)
        assert png.read_bytes() == saved.read_bytes()  # the download is the file on disk, byte for byte
        assert scope.get_by_role("img", name="Result").is_visible()
        pictures[caption] = png
    assert reads_as(pictures[YELLOW], YELLOW) and reads_as(pictures[RED], RED)
    assert not reads_as(pictures[YELLOW], RED)  # the reading tells the two prompts apart
    names = [saved.name for saved in server.pngs()][-2:]
    for name in names:  # this run's images, captioned with their file names
        expect(page.locator("#t2i-gallery")).to_contain_text(name)


def test_a_bad_size_is_refused_in_the_page_and_the_next_job_runs(new_page, server: UiServer) -> None:
    page = new_page()
    before = server.pngs()
    fill(page, prompt=RED, width=33, steps=4)
    plan = page.locator("#t2i-plan textarea")
    page.get_by_role("button", name="Generate", exact=True).click()
    status = expect_status(page, "multiple of 8")
    assert status.startswith("Error: width 33 is not a positive multiple of 8") and "try 32" in status
    assert "multiple of 8" in plan.input_value()
    assert server.pngs() == before  # nothing was written
    status = generate(page, width=32)  # seed -1: a random one, shown and reusable
    assert "32x32" in status and len(server.pngs()) == len(before) + 1
    used = re.search(r"seed (\d+),", status).group(1)
    assert read_png_parameters(server.outputs / saved_name(status)).seed == int(used)
    page.get_by_role("button", name="Reuse last seed", exact=True).click()
    expect(page.locator("#tab-generate").get_by_label("Seed", exact=True)).to_have_value(used)


def test_two_pages_queue_and_both_finish_in_order(new_page, server: UiServer) -> None:
    first, second = new_page(), new_page()
    fill(first, prompt=RED, width=64, height=64, steps=40, seed=1)
    fill(second, prompt=YELLOW, width=32, height=32, steps=5, seed=2)
    first.get_by_role("button", name="Generate", exact=True).click()
    expect_status(first, re.compile(r"step [1-9]\d* of 40"))
    second.get_by_role("button", name="Generate", exact=True).click()
    waiting = expect_status(second, "Waiting")
    assert waiting == "Waiting: 1st in the queue (1 job ahead of yours on the device)."
    first_done = expect_status(first, "Done in")
    second_done = expect_status(second, "Done in")
    first_file, second_file = (
        server.outputs / saved_name(first_done),
        server.outputs / saved_name(second_done),
    )
    assert first_file.name < second_file.name  # numbered in the order they were written
    assert first_file.stat().st_mtime <= second_file.stat().st_mtime
    assert read_png_parameters(first_file).prompt == RED and read_png_parameters(second_file).prompt == YELLOW


def test_stages_appear_as_they_finish_and_cancel_stops_the_chain_between_steps(
    new_page, server: UiServer
) -> None:
    page = new_page()
    before = server.pngs()
    choose_mode(page, "SDEdit chain")  # 32, 64 and 128 px: 80, 32 and 8 steps
    fill(page, prompt=RED, width=128, height=128, steps=80, seed=5)
    page.get_by_role("button", name="Generate", exact=True).click()
    progress = r"Stage 3 of 3 \(128x128\) · step [1-7] of 8 · .* elapsed · about .* left"
    expect_status(page, re.compile(progress))
    for caption in ("1: 32x32", "2: 64x64"):  # the finished stages, while the last one runs
        expect(page.locator("#t2i-stages")).to_contain_text(caption)
    asked = time.monotonic()
    page.locator("#tab-generate").get_by_role("button", name="Cancel", exact=True).click()
    status = expect_status(page, "Cancelled", timeout=15_000)
    assert time.monotonic() - asked < 10  # a step of the 128 px stage takes a fraction of a second here
    assert re.fullmatch(r"Cancelled \(stage 3 of 3, step [1-8]\); nothing was saved\.", status), status
    expect(page.locator("#t2i-stages")).not_to_contain_text("1: 32x32")  # nothing of it stays on the page
    assert server.pngs() == before
    choose_mode(page, "plain")
    assert "32x32" in generate(page, width=32, height=32, steps=4)  # the device is free for the next job


def test_closing_a_page_cancels_its_job(new_page, server: UiServer) -> None:
    leaving, staying = new_page(), new_page()
    before = server.pngs()
    fill(leaving, prompt=RED, width=64, height=64, steps=500, seed=6)
    leaving.get_by_role("button", name="Generate", exact=True).click()
    expect_status(leaving, re.compile(r"step [1-9]\d* of 500"))
    leaving.context.close()
    started = time.monotonic()
    assert "32x32" in generate(staying, prompt=YELLOW, steps=3)
    assert time.monotonic() - started < 20  # the 500 steps left would take about a minute
    assert len(server.pngs()) == len(before) + 1  # the closed page's job saved nothing


def test_a_dropped_png_restores_its_parameters(new_page, tmp_path: Path) -> None:
    page = new_page()
    choose_mode(page, "SDEdit chain")
    page.locator("#tab-generate").get_by_label("LinFusion", exact=True).uncheck()
    status = generate(
        page, prompt=YELLOW, negative="dark", width=64, height=48, steps=7, guidance=3.5, seed=1234
    )
    png = download_png(page)
    assert "64x48" in status

    fresh = new_page()
    drop_file(fresh, "#t2i-prompt textarea", png.read_bytes(), "dropped.png")  # anywhere on the tab
    expect_status(fresh, "Restored the parameters of dropped.png.")
    scope = fresh.locator("#tab-generate")
    values = {label: scope.get_by_label(label, exact=True).input_value() for label in
              ("Prompt", "Negative prompt", "Width", "Height", "Steps", "Guidance", "Seed")}  # fmt: skip
    assert values == {"Prompt": YELLOW, "Negative prompt": "dark", "Width": "64", "Height": "48", "Steps": "7",
                      "Guidance": "3.5", "Seed": "1234"}  # fmt: skip
    assert scope.get_by_role("radiogroup", name="Mode").get_by_label("SDEdit chain", exact=True).is_checked()
    assert not scope.get_by_label("LinFusion", exact=True).is_checked()
    expect(combobox(fresh, "Size preset")).to_have_value("custom")  # 64x48 is no preset of the 1:1 ratio
    assert click_and_wait(fresh, "Generate").startswith("Done in")
    remade = download_png(fresh)
    assert np.array_equal(np.asarray(Image.open(remade)), np.asarray(Image.open(png)))  # the same image again

    drop_file(fresh, "#t2i-restore button", b"this is not a picture", "notes.png")
    expect_status(fresh, "Error: notes.png is not a readable image")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    drop_file(fresh, "#t2i-result", plain.read_bytes(), "plain.png")
    expect_status(fresh, "Error: plain.png has no 'parameters' text chunk")


def test_the_upscale_tab_enlarges_an_upload_with_plan_progress_and_result(new_page, server: UiServer) -> None:
    page = new_page()
    generate(page, prompt=RED, steps=10, guidance=4, seed=4)
    small = download_png(page)
    page.get_by_role("tab", name="Upscale").click()
    tab = page.locator("#tab-upscale")
    page.locator("#up-file input[type=file]").set_input_files(
        {"name": "notes.png", "mimeType": "image/png", "buffer": b"plain text"}
    )
    expect_status(page, "Error: notes.png is not a readable image", tab="up")
    page.locator("#up-file input[type=file]").set_input_files(str(small))
    expect_status(page, "32x32. Ready.", tab="up")
    expect(page.locator("#up-plan textarea")).to_have_value(re.compile(r"^Fits(.|\n)*stage 1 64x64"))
    tab.get_by_label("Prompt", exact=True).fill(RED)
    tab.get_by_label("Steps", exact=True).fill("10")
    tab.get_by_label("Seed", exact=True).fill("8")
    status = click_and_wait(page, "Upscale", tab="up")
    assert "64x64" in status and "seed 8" in status
    expect(page.locator("#up-stages")).to_contain_text("1: 64x64")  # the stage's preview
    big = download_png(page, tab="up")
    params = read_png_parameters(big)
    assert (params.width, params.height, params.mode, params.prompt) == (64, 64, "sdedit", RED)
    assert reads_as(big, RED)

    page.get_by_role("tab", name="Generate").click()  # the Generate tab's result goes to this tab in a click
    made = saved_name(generate(page, prompt=YELLOW, steps=4, seed=9))
    page.get_by_role("button", name="Send result to Upscale", exact=True).click()
    expect_status(page, f"{made}: 32x32. Ready.", tab="up")
    expect(tab).to_be_visible()
    expect(tab.get_by_label("Prompt", exact=True)).to_have_value(YELLOW)  # the result's prompt and seed
    expect(tab.get_by_label("Seed", exact=True)).to_have_value("9")
    status = click_and_wait(page, "Upscale", tab="up")
    text = read_png_parameters_text(download_png(page, tab="up"))
    assert "seed 9" in status and f"Upscaled from: {made}, Upscale factor: 2" in text
    assert read_png_parameters(server.outputs / saved_name(status)).prompt == YELLOW


def test_uploads_over_the_cap_and_files_outside_the_outputs_are_refused(
    new_page, server: UiServer, tmp_path
) -> None:
    import httpx

    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    big = tmp_path / "big.png"
    Image.fromarray(noise).save(big)  # about 1.9 MB of incompressible pixels
    assert big.stat().st_size > UPLOAD_CAP_MB * 2**20
    page = new_page()
    saved = server.outputs / saved_name(generate(page, prompt=RED, steps=2))
    page.get_by_role("tab", name="Upscale").click()
    page.locator("#up-file input[type=file]").set_input_files(str(big))
    expect(page.locator(".toast-body")).to_contain_text("exceed the maximum allowed size")
    with big.open("rb") as handle:  # the server refuses it too, not only the page
        response = httpx.post(
            server.url + "gradio_api/upload", files={"files": ("big.png", handle, "image/png")}
        )
    assert response.status_code == 413
    outside = [REPO / "pyproject.toml", Path("/etc/hostname"), big]
    for path in outside:
        assert httpx.get(f"{server.url}gradio_api/file={path}").status_code == 403, path
    assert httpx.get(f"{server.url}gradio_api/file={saved}").content == saved.read_bytes()  # its own outputs


def test_the_plan_names_the_smallest_budget_and_a_job_over_it_is_refused(new_page, server: UiServer) -> None:
    page = new_page()
    fill(page, prompt=RED, steps=4)
    plan = page.locator("#t2i-plan textarea")
    budget = page.locator("#tab-generate").get_by_label("Memory budget", exact=True)
    budget.fill("1MB")
    expect(plan).to_have_value(re.compile("^Does not fit the budget of 1 MiB"))
    entry = re.search(r"enter (\S+) as the memory budget", plan.input_value()).group(1)
    before = server.pngs()
    page.get_by_role("button", name="Generate", exact=True).click()
    status = expect_status(page, "Error: Does not fit")
    assert f"enter {entry} as the memory budget" in status and server.pngs() == before
    budget.fill(entry)
    expect(plan).to_have_value(re.compile("^Fits: estimated peak .* within the budget of"))
    budget.fill("")  # the free memory; the plan follows the mode and the size, and nothing runs
    choose_mode(page, "SDEdit chain")
    fill(page, width=128, height=128)
    expect(plan).to_have_value(re.compile(r"^Fits(.|\n)*stage 3 128x128, 1 steps"))
    assert server.pngs() == before
    choose_mode(page, "plain")  # a 4K UHD preset, planned in one pass, with all of this machine's memory
    budget.fill(f"{machine_memory() * 10 // 2**30 / 10:g}GB")
    scope = page.locator("#tab-generate")
    scope.get_by_role("combobox", name="Aspect ratio").click()
    page.get_by_role("option", name="16:9", exact=True).click()
    scope.get_by_role("combobox", name="Size preset").click()
    page.get_by_role("option", name="4K UHD (3840)", exact=True).click()
    expect(scope.get_by_label("Width", exact=True)).to_have_value("3840")
    expect(scope.get_by_label("Height", exact=True)).to_have_value("2160")
    expect(plan).to_have_value(re.compile(r"^Fits: .* within the budget of .* GiB\.\nstage 1 3840x2160"))
    budget.fill(f"{2 * machine_memory() // 2**30}GB")  # more than the machine has: refused, never advised
    expect(plan).to_have_value(re.compile(r"^Cannot plan: memory budget .* is more than this cpu device has"))
    page.get_by_role("button", name="Generate", exact=True).click()
    status = expect_status(page, "Error: memory budget")
    assert "enter at most" in status and server.pngs() == before


def test_a_preset_applies_only_when_chosen_and_reads_custom_otherwise(new_page, server: UiServer) -> None:
    page = new_page()
    scope = page.locator("#tab-generate")
    fill(page, prompt=RED, width=64, height=64, steps=3)
    expect(combobox(page, "Size preset")).to_have_value("custom")
    for name in ("Size preset", "Aspect ratio"):  # tabbing past a menu changes nothing
        combobox(page, name).focus()
        page.keyboard.press("Tab")
    page.wait_for_timeout(500)
    assert "64x64" in click_and_wait(page, "Generate")
    expect(scope.get_by_label("Width", exact=True)).to_have_value("64")
    combobox(page, "Size preset").click()
    label = scope.locator("#t2i-preset").get_by_text("Size preset", exact=True).bounding_box()
    options = page.locator("#t2i-preset .options").bounding_box()
    assert label["y"] + label["height"] <= options["y"] or options["y"] + options["height"] <= label["y"]
    page.get_by_role("option", name="512", exact=True).click()
    expect(scope.get_by_label("Width", exact=True)).to_have_value("512")
    expect(scope.get_by_label("Height", exact=True)).to_have_value("512")
    expect(combobox(page, "Size preset")).to_have_value("512")
    combobox(page, "Aspect ratio").click()
    page.get_by_role("option", name="16:9", exact=True).click()
    expect(scope.get_by_label("Height", exact=True)).to_have_value("288")
    expect(combobox(page, "Size preset")).to_have_value("512")
    fill(page, width=200)
    expect(combobox(page, "Size preset")).to_have_value("custom")


def test_a_bad_field_is_named_in_the_status_line_and_the_plan_follows_the_steps(
    new_page, server: UiServer
) -> None:
    page = new_page()
    before, log_lines = server.pngs(), len(server.log)
    plan = page.locator("#t2i-plan textarea")
    fill(page, prompt=RED, steps=0)
    expect(plan).to_have_value("Cannot plan: steps must be a whole number >= 1; got 0")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect_status(page, "Error: steps must be a whole number >= 1; got 0")
    assert page.locator(".toast-body").count() == 0  # no popup naming no field
    expect(page.locator("#t2i-status")).to_have_class(re.compile("error-line"))
    color = page.locator("#t2i-status [data-testid='markdown']").evaluate("e => getComputedStyle(e).color")
    assert color != page.locator("#t2i-plan").evaluate("e => getComputedStyle(e).color")
    fill(page, steps=12, guidance="")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect_status(page, "Error: guidance is empty: enter a number (e.g. 7.5)")
    fill(page, guidance=4)
    choose_mode(page, "SDEdit chain")
    fill(page, width=128, height=128)
    expect(plan).to_have_value(re.compile(r"^Fits.*\nstage 1 32x32, 12 steps.*\nstage 2 64x64, 4 steps"))
    fill(page, steps=60)
    expect(plan).to_have_value(re.compile(r"^Fits.*\nstage 1 32x32, 60 steps.*\nstage 2 64x64, 24 steps"))
    assert server.pngs() == before
    assert not [line for line in server.log[log_lines:] if "Traceback" in line]
    choose_mode(page, "plain")
    generate(page, width=32, height=32, steps=2)
    expect(page.locator("#t2i-status")).not_to_have_class(re.compile("error-line"))  # a line that is no error
    assert combobox(page, "Sampler").input_value() == "ddim (default)"  # as the Parameters text names it
    placeholder_fits = page.locator("#t2i-budget textarea").evaluate(
        "e => { const s = document.createElement('span'); s.style.font = getComputedStyle(e).font;"
        " s.style.position = 'absolute'; s.style.whiteSpace = 'pre'; s.textContent = e.placeholder;"
        " document.body.append(s); const w = s.offsetWidth; s.remove(); const style = getComputedStyle(e);"
        " return w <= e.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight); }"
    )
    assert placeholder_fits
    upload_fits = page.locator("#t2i-restore").evaluate(  # the words themselves, not their centred box
        "e => { const walk = document.createTreeWalker(e, NodeFilter.SHOW_TEXT); let node;"
        " while ((node = walk.nextNode()) && !node.textContent.includes('Click to Upload')) {}"
        " const range = document.createRange(); range.selectNodeContents(node);"
        " const text = range.getBoundingClientRect(), box = e.getBoundingClientRect();"
        " return box.top <= text.top && text.bottom <= box.bottom; }"
    )
    assert upload_fits


def test_a_second_click_queues_and_ctrl_enter_generates(new_page, server: UiServer) -> None:
    page = new_page()
    before = server.pngs()
    fill(page, prompt=RED, width=64, height=64, steps=60, seed=1)
    page.get_by_role("button", name="Generate", exact=True).click()
    expect_status(page, re.compile(r"\[#*\.*\] \d+% Stage 1 of 1 \(64x64\) · step [1-9]\d* of 60"))
    page.locator("#tab-generate").get_by_label("Prompt", exact=True).press("Control+Enter")
    expect_status(page, re.compile(r"step \d+ of 60 .*\(1 more of yours queued\)"))
    expect(page.locator("#t2i-gallery")).to_contain_text(f"{len(before) + 2:05d}-1.png")
    expect_status(page, "Done in")
    assert len(server.pngs()) == len(before) + 2  # both clicks made an image
    fill(page, width=32, height=32, steps=3, seed=2)
    page.locator("#tab-generate").get_by_label("Seed", exact=True).press("Enter")
    expect_status(page, re.compile(r"Done in .* 32x32, seed 2,"))
    fill(page, seed=7)
    page.locator("#tab-generate").get_by_label("Batch count", exact=True).fill("2")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect_status(page, re.compile(r"Done in .* seed 8,"))  # seeds 7 and 8, one after the other
    names = [path.name for path in server.pngs()][-2:]
    assert [name.split("-")[1] for name in names] == ["7.png", "8.png"]
    rendering = page.locator("#t2i-result img").evaluate("e => getComputedStyle(e).imageRendering")
    assert rendering == "pixelated"  # a 32 px result shown larger stays sharp


def test_plain_mode_above_the_native_size_suggests_the_sdedit_chain(new_page) -> None:
    page = new_page()
    hint, hires = page.locator("#t2i-mode-hint"), page.locator("#t2i-hires")
    mode = page.locator("#tab-generate").get_by_role("radiogroup", name="Mode")
    expect(hires).to_be_hidden()  # plain at the native 32 px: nothing to say
    assert "native" not in hint.inner_text()
    fill(page, width=64)
    expect(hint).to_contain_text("native 32 px repeats objects")
    expect(hint).to_contain_text("64x32")
    hires.click()
    expect(mode.get_by_label("SDEdit chain", exact=True)).to_be_checked()
    expect(hires).to_be_hidden()
    expect(hint).not_to_contain_text("native")
    choose_mode(page, "plain")
    expect(hint).to_contain_text("native 32 px")
    fill(page, width=32, height=24)  # at or below the native size, plain is right
    expect(hires).to_be_hidden()
    expect(hint).not_to_contain_text("native")


def test_clicking_an_image_of_this_run_restores_its_settings(new_page) -> None:
    page = new_page()
    first = saved_name(generate(page, prompt=YELLOW, negative="dark", width=32, height=24, steps=3, seed=11))
    page.locator("#tab-generate").get_by_label("LinFusion", exact=True).uncheck()
    generate(page, prompt=RED, negative="", width=40, height=32, steps=4, guidance=3, seed=12)
    page.locator("#t2i-gallery").get_by_text(first).first.click()
    expect_status(page, f"Restored the parameters of {first}.")
    scope = page.locator("#tab-generate")
    values = {label: scope.get_by_label(label, exact=True).input_value() for label in
              ("Prompt", "Negative prompt", "Width", "Height", "Steps", "Guidance", "Seed")}  # fmt: skip
    assert values == {"Prompt": YELLOW, "Negative prompt": "dark", "Width": "32", "Height": "24", "Steps": "3",
                      "Guidance": "7.5", "Seed": "11"}  # fmt: skip
    assert scope.get_by_label("LinFusion", exact=True).is_checked()


SETTINGS_KEY = "linfusion-settings"  # where the page keeps its settings (localStorage)
FIELD_LABELS = ("Prompt", "Negative prompt", "Width", "Height", "Batch count", "Steps", "Guidance", "Seed",
                "Memory budget")  # fmt: skip


def field_values(page) -> dict[str, str]:
    scope = page.locator("#tab-generate")
    menus = {
        name: combobox(page, name).input_value()
        for name in ("Size preset", "Aspect ratio", "Sampler", "Model")
    }
    return {**{label: scope.get_by_label(label, exact=True).input_value() for label in FIELD_LABELS}, **menus}


def wait_until_stored(page, expected: dict | None) -> None:
    """Until the page's storage holds ``expected`` (a subset of what it keeps), or nothing for None."""
    page.wait_for_function(
        """([key, expected]) => { const text = localStorage.getItem(key);
        if (expected === null) return text === null; const stored = JSON.parse(text || "{}");
        return Object.entries(expected).every(([name, value]) => JSON.stringify(stored[name]) ===
          JSON.stringify(value)); }""",
        arg=[SETTINGS_KEY, expected],
    )


def choose(page, menu: str, option: str) -> None:
    combobox(page, menu).click()
    page.get_by_role("option", name=option, exact=True).click()


def test_settings_survive_a_reload_and_the_next_job_uses_them(new_page, server: UiServer) -> None:
    page = new_page()
    scope = page.locator("#tab-generate")
    fill(page, prompt=RED, negative="dark", width=48, height=40, steps=3, guidance=4.5, seed=77)
    scope.get_by_label("Batch count", exact=True).fill("2")
    scope.get_by_label("Memory budget", exact=True).fill("2GB")
    choose(page, "Sampler", "euler")
    scope.get_by_label("LinFusion", exact=True).uncheck()
    scope.get_by_role("radiogroup", name="VAE attention").get_by_label("linear", exact=True).check()
    page.get_by_role("tab", name="Upscale").click()
    page.locator("#tab-upscale").get_by_label("Scale", exact=True).fill("4")
    page.locator("#tab-upscale").get_by_label("Steps", exact=True).fill("9")
    page.get_by_role("tab", name="Generate").click()
    expect(combobox(page, "Size preset")).to_have_value("custom")
    chosen = field_values(page)
    wait_until_stored(page, {"generate.seed": 77, "generate.sampler": "euler", "generate.linfusion": False,
                             "generate.vae_attention": "linear", "upscale.steps": 9})  # fmt: skip

    page.reload()
    expect(scope.get_by_label("Seed", exact=True)).to_have_value("77")
    expect(combobox(page, "Sampler")).to_have_value("euler")
    assert field_values(page) == chosen
    assert chosen["Size preset"] == "custom" and chosen["Width"] == "48"  # not a preset applied over the size
    assert not scope.get_by_label("LinFusion", exact=True).is_checked()
    assert (
        scope.get_by_role("radiogroup", name="VAE attention").get_by_label("linear", exact=True).is_checked()
    )
    page.get_by_role("tab", name="Upscale").click()
    upscale = page.locator("#tab-upscale")
    assert upscale.get_by_label("Scale", exact=True).input_value() == "4"
    assert upscale.get_by_label("Steps", exact=True).input_value() == "9"
    page.get_by_role("tab", name="Generate").click()
    expect(page.locator("#t2i-plan textarea")).to_have_value(re.compile(r"^Fits.*\nstage 1 48x40, 3 steps"))
    before = server.pngs()
    expect_status(page, "Ready.")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect_status(page, re.compile(r"Done in .*: 48x40, seed 78, "))  # seeds 77 and 78, one after the other
    added = [path for path in server.pngs() if path not in before]
    assert [path.name.split("-")[1] for path in added] == ["77.png", "78.png"]
    params = read_png_parameters(added[0])
    assert (params.prompt, params.negative_prompt, params.width, params.height, params.steps, params.guidance,
            params.seed) == (RED, "dark", 48, 40, 3, 4.5, 77)  # fmt: skip
    assert (params.scheduler, params.linfusion, params.vae_attention) == ("euler", "none", "linear")


def test_reset_to_defaults_puts_the_defaults_back_and_a_reload_keeps_them(new_page) -> None:
    page = new_page()
    scope = page.locator("#tab-generate")
    defaults = field_values(page)
    fill(page, prompt=YELLOW, steps=7, seed=5)
    choose(page, "Aspect ratio", "4:3")
    choose(page, "Size preset", "512")  # a preset chosen: it reads so again after a reload
    expect(scope.get_by_label("Height", exact=True)).to_have_value("384")
    choose_mode(page, "DemoFusion")
    upscale = page.locator("#tab-upscale")
    page.get_by_role("tab", name="Upscale").click()
    upscale.get_by_label("Scale", exact=True).fill("4")
    page.get_by_role("tab", name="Generate").click()
    wait_until_stored(page, {"generate.width": 512, "generate.height": 384, "generate.preset": 512,
                             "generate.mode": "demofusion", "generate.seed": 5, "upscale.scale": 4})  # fmt: skip
    chosen = field_values(page)
    page.reload()
    expect(scope.get_by_label("Seed", exact=True)).to_have_value("5")
    assert field_values(page) == chosen
    assert (chosen["Size preset"], chosen["Width"], chosen["Height"]) == ("512", "512", "384")
    assert scope.get_by_role("radiogroup", name="Mode").get_by_label("DemoFusion", exact=True).is_checked()

    scope.get_by_role("button", name="Reset to defaults", exact=True).click()
    expect(scope.get_by_label("Seed", exact=True)).to_have_value(defaults["Seed"])
    assert field_values(page) == defaults
    assert scope.get_by_role("radiogroup", name="Mode").get_by_label("plain", exact=True).is_checked()
    page.get_by_role("tab", name="Upscale").click()
    expect(upscale.get_by_label("Scale", exact=True)).to_have_value("4")  # each tab resets its own fields
    upscale.get_by_role("button", name="Reset to defaults", exact=True).click()
    expect(upscale.get_by_label("Scale", exact=True)).to_have_value("2")
    page.get_by_role("tab", name="Generate").click()
    wait_until_stored(page, None)  # nothing differs from the defaults: nothing is kept
    page.reload()
    expect(page.locator("#t2i-plan textarea")).to_have_value(re.compile("^Fits"))
    page.wait_for_timeout(1500)  # a stored value would have been put back by now
    assert field_values(page) == defaults


def test_stored_values_the_page_cannot_hold_are_ignored(new_page, server: UiServer) -> None:
    page = new_page()
    defaults, log_lines = field_values(page), len(server.log)
    stored = {"generate.sampler": "no-such-sampler", "generate.steps": "abc", "generate.model": "gone/model",
              "generate.width": 40.5, "generate.prompt": 12, "generate.linfusion": "no", "generate.seed": 5,
              "generate.ratio": "4:3", "upscale.scale": 3, "upscale.model": "gone/model", "unknown": 1}  # fmt: skip
    for text in ("not JSON {", "[1, 2]", json.dumps(stored)):
        page.evaluate("([key, text]) => localStorage.setItem(key, text)", [SETTINGS_KEY, text])
        page.reload()
        expect(page.locator("#t2i-plan textarea")).to_have_value(re.compile("^Fits"))
    scope = page.locator("#tab-generate")
    expect(scope.get_by_label("Seed", exact=True)).to_have_value("5")
    assert field_values(page) == {**defaults, "Seed": "5", "Aspect ratio": "4:3", "Size preset": "custom"}
    assert scope.get_by_label("LinFusion", exact=True).is_checked()
    expect_status(page, "Ready.")
    page.get_by_role("tab", name="Upscale").click()
    assert page.locator("#tab-upscale").get_by_label("Scale", exact=True).input_value() == "3"
    assert page.locator("#tab-upscale").get_by_role("combobox", name="Model").input_value() == "bundled"
    assert not [line for line in server.log[log_lines:] if "Traceback" in line or "Error" in line]


def test_the_queue_lists_this_pages_jobs_each_with_its_own_cancel(new_page, server: UiServer) -> None:
    page = new_page()
    before = server.pngs()
    queue = page.locator("#queue")
    expect(queue).to_contain_text("Your jobs: none")
    fill(page, prompt=RED, width=64, height=64, steps=60, seed=1)
    page.locator("#tab-generate").get_by_label("Batch count", exact=True).fill("3")  # seeds 1, 2, 3
    page.get_by_role("button", name="Generate", exact=True).click()
    rows = queue.locator(".queue-row")
    expect(rows).to_have_count(3)
    expect(rows.nth(0)).to_contain_text("Generate 64x64, seed 1 (running)")
    expect(rows.nth(1)).to_contain_text("Generate 64x64, seed 2 (waiting, 1st in the queue)")
    expect(rows.nth(2)).to_contain_text("Generate 64x64, seed 3 (waiting, 2nd in the queue)")
    rows.nth(1).get_by_role("button", name="Cancel").click()  # the waiting seed 2 only
    expect(rows).to_have_count(2)
    expect(rows.nth(1)).to_contain_text("seed 3 (waiting, 1st in the queue)")
    expect_status(page, re.compile(r"step [1-9]\d* of 60"))
    rows.nth(0).get_by_role("button", name="Cancel").click()  # the running seed 1: stops at its next step
    expect(rows).to_have_count(1)
    expect(rows.nth(0)).to_contain_text("seed 3 (running)")
    expect_status(page, re.compile(r"Done in .* seed 3,"))
    expect(queue).to_contain_text("Your jobs: none")
    added = [path.name for path in server.pngs() if path not in before]
    assert [name.split("-")[1] for name in added] == ["3.png"]  # seeds 1 and 2 saved nothing


def test_a_live_preview_shows_while_it_denoises_without_slowing_the_status_line(new_page) -> None:
    page = new_page()
    page.evaluate(GAP_JS)
    fill(page, prompt=RED, width=64, height=64, steps=80, seed=5)
    page.get_by_role("button", name="Generate", exact=True).click()
    expect_status(page, "Done in", timeout=180_000)
    previews = list(dict.fromkeys(page.evaluate("window.previews")))  # each image once, in order
    assert len(previews) >= 2  # about one every 3 s of the job's steps
    gaps = status_gaps(page)
    print(
        f"{len(previews)} previews; status gaps: {len(gaps)}, max {max(gaps):.2f} s, mean {sum(gaps) / len(gaps):.2f} s"
    )
    assert max(gaps) < 2.0  # the status line keeps its pace (0.5 s) while previews are sent
    final = page.locator("#t2i-result img")
    assert final.evaluate("e => e.naturalWidth") == 64  # the result replaced the last preview


def test_readme_screenshot(new_page) -> None:
    """The picture in the README: a chain to 128 px with its stages (written where $LINFUSION_UI_SCREENSHOT says)."""
    page = new_page(width=1280, height=1100)
    choose_mode(page, "SDEdit chain")
    status = generate(page, prompt=YELLOW, width=128, height=128, steps=12, guidance=4, seed=3)
    assert "128x128" in status
    for caption in ("1: 32x32", "2: 64x64", "3: 128x128"):
        expect(page.locator("#t2i-stages")).to_contain_text(caption)
    target = os.environ.get(SCREENSHOT_ENV)
    shot = page.screenshot(path=target or None, full_page=False)
    assert Image.open(io.BytesIO(shot)).size == (1280, 1100)


def test_nothing_leaves_the_machine(new_page, recorder: ConnectionRecorder) -> None:
    page = new_page()
    generate(page, prompt=RED, steps=2)
    page.get_by_role("tab", name="Upscale").click()
    page.wait_for_timeout(500)
    assert REQUESTED_HOSTS and REQUESTED_HOSTS <= LOOPBACK, REQUESTED_HOSTS  # no font, script or image
    assert recorder.attempts == []  # the server tried to reach no other address (analytics, updates...)


def test_a_missing_chromium_fails_the_tests_rather_than_skipping_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LINFUSION_CHROMIUM", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="need Chromium: apt-get install -y chromium"):
        find_chromium()
