"""The web UI driven like a person would: Debian's Chromium, headless, against the tiny saved model.

No skips: if Gradio, Playwright or the browser is missing, these tests fail (CI installs them:
scripts/test.sh). ATTNDISTILL_SCREENSHOT=1 also writes docs/ui-screenshot.png for the README.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import shlex
import shutil
import socket
import threading
import time
import weakref
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from attndistill.core.progress import StepInfo  # noqa: E402
from attndistill.presets import PRESETS  # noqa: E402
from attndistill.webui.app import DEVICE_QUEUE, Cancelled, Job, ModelSlot, WebUI, cli_command  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
README_SHOT = Path(__file__).parent.parent / "docs" / "ui-screenshot.png"
UPLOAD_LIMIT_MB = 1
RUN_TIMEOUT_MS = 240_000  # a shared 2-core CI box can be slow; a free one finishes in seconds


#: What the server fixture's launch printed.
STARTED: dict[str, str] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_sd15_dir, tmp_path_factory):
    ui = WebUI(model=str(tiny_sd15_dir), device="cpu", dtype="fp32", outputs=tmp_path_factory.mktemp("ui-out"))
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):  # what `attndistill ui` prints when it starts
        demo = ui.launch(port=_free_port(), block=False, max_upload_mb=UPLOAD_LIMIT_MB)
    STARTED["text"] = printed.getvalue()
    try:
        yield demo.local_url, ui
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)  # fails the test if it cannot start
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 1500})
    outside = []  # the page must work offline: fonts, scripts and data all come from the app
    page.on("request", lambda r: outside.append(r.url) if urlparse(r.url).hostname not in (None, "127.0.0.1") else None)
    page.goto(server[0])
    page.wait_for_selector("#style-target input[type=file]", state="attached", timeout=60_000)
    yield page
    page.close()
    assert not outside


def _fill(page, elem_id: str, value: str) -> None:
    """Type into a field like a person: wait until it is shown, fill it, leave it, check it kept the value."""
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.wait_for(state="visible")
    for _ in range(10):  # a fold that is still opening can re-render a field and drop what was typed
        box.fill(value)
        box.press("Tab")
        page.wait_for_timeout(100)
        if box.input_value() == value:
            break
    expect(box).to_have_value(value)


def _paint_a_patch(page, elem_id: str) -> None:
    """Drag the brush down the middle of a mask painter, stroke beside stroke, as a person fills a region."""
    canvas = page.locator(f"#{elem_id} canvas").first
    canvas.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    box = canvas.bounding_box()
    for stroke in range(6):
        x = box["x"] + box["width"] * (0.45 + 0.015 * stroke)
        page.mouse.move(x, box["y"] + box["height"] * 0.2)
        page.mouse.down()
        page.mouse.move(x, box["y"] + box["height"] * 0.8, steps=5)
        page.mouse.up()


def test_style_transfer_in_the_browser(page, server, data_dir, tmp_path, monkeypatch):
    ui, queued = server[1], []
    original = ui.runs.queued
    monkeypatch.setattr(ui.runs, "queued", lambda key: (queued.append(key[1]), original(key))[1])
    page.locator("#style-target input[type=file]").set_input_files(data_dir / "horse.jpg")
    page.locator("#style-reference input[type=file]").set_input_files(data_dir / "watercolor-cat.jpg")
    _fill(page, "style-steps", "2")
    _fill(page, "style-size", "128x64")
    _fill(page, "style-seed", "3")
    page.get_by_text("Advanced").first.click()
    _fill(page, "style-preview-every", "1")
    _paint_a_patch(page, "style-mask")  # over the content, which the painter shows once it is uploaded
    page.locator("#style-run").click()

    result = page.locator("#style-gallery img").first
    result.wait_for(timeout=RUN_TIMEOUT_MS)
    expect(page.locator("#style-preview img")).to_have_count(1)  # the live preview of step 1 arrived
    expect(page.locator("#style-status")).to_contain_text("loss")
    assert queued == ["style"]  # the click took a ticket first, so Cancel could have withdrawn the run
    assert not any(key[1] == "style" for key in ui.runs._waiting)  # and the run handed it back when it started
    page.screenshot(path=tmp_path / "style-transfer.png", full_page=True)
    if os.environ.get("ATTNDISTILL_SCREENSHOT"):
        page.get_by_text("Advanced").first.click()  # folded, as a visitor first sees it
        README_SHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=README_SHOT, full_page=True)
        Image.open(README_SHOT).convert("RGB").quantize(256).save(README_SHOT, optimize=True)  # a lighter repo

    # what the page serves is the PNG with its parameters, at the size asked for
    response = page.request.get(result.get_attribute("src"))
    assert response.ok
    png = Image.open(io.BytesIO(response.body()))
    assert png.format == "PNG" and png.size == (128, 64)
    params = json.loads(png.text["attndistill"])
    assert params["task"] == "style" and params["steps"] == 2 and params["seed"] == 3
    assert params["size"] == [128, 64] and params["content_weight"] == PRESETS["style"].content_weight
    assert Path(params["mask"]).name.endswith("-mask.png") and Path(params["mask"]).is_file()  # the patch
    pixels = np.asarray(png.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 1.0  # a real image, not a blank canvas

    # "copy as CLI command" reproduces the run from the terminal
    from typer.testing import CliRunner

    from attndistill.cli import app

    command = page.locator("#style-cli textarea, #style-cli input").first.input_value()
    words = shlex.split(command)
    assert words[:4] == ["attndistill", "style", "horse.jpg", "watercolor-cat.jpg"]
    shutil.copy(data_dir / "horse.jpg", tmp_path)
    shutil.copy(data_dir / "watercolor-cat.jpg", tmp_path)
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke(app, [*words[1:], "--quiet"])
    assert run.exit_code == 0, run.output
    output = tmp_path / words[words.index("--output") + 1]
    again = np.asarray(Image.open(output).convert("RGB"), dtype=np.float32)
    assert np.abs(again - pixels).max() <= 1.0


def test_bad_input_shows_a_readable_message(page, data_dir, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is a text file, not a picture")
    page.locator("#style-reference input[type=file]").set_input_files(fake)
    expect(page.get_by_text("style image 'fake.png' is not an image")).to_be_visible(timeout=30_000)
    expect(page.locator("#style-reference img")).to_have_count(0)  # refused: the box is empty again

    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    page.locator("#style-target input[type=file]").set_input_files(notes)
    expect(page.get_by_text("Invalid file type").first).to_be_visible(timeout=30_000)

    big = tmp_path / "big.png"  # random pixels do not compress: well over the upload limit
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > UPLOAD_LIMIT_MB * 1024 * 1024
    page.get_by_role("tab", name="Appearance transfer").click()
    page.locator("#appearance-target input[type=file]").set_input_files(big)
    expect(page.get_by_text("exceed").first).to_be_visible(timeout=30_000)

    page.locator("#appearance-run").click()
    expect(page.get_by_text("structure image is missing").first).to_be_visible(timeout=60_000)

    page.locator("#appearance-target input[type=file]").set_input_files(data_dir / "golden-gate.jpg")
    page.locator("#appearance-reference input[type=file]").set_input_files(data_dir / "wood-rings.jpg")
    _fill(page, "appearance-size", "100000x100000")
    page.locator("#appearance-run").click()
    expect(page.get_by_text("too large").first).to_be_visible(timeout=60_000)
    page.screenshot(path=tmp_path / "bad-input.png", full_page=True)
    assert "Traceback" not in page.content()


def test_cancel_stops_a_job_between_steps():
    finished = threading.Event()
    produced: list[int] = []

    def task(callback):
        try:
            for i in range(10_000):
                time.sleep(0.001)
                produced.append(i)
                callback(StepInfo(i, 10_000, 999 - i % 1000, 1.0 / (i + 1), torch.zeros(1, 4, 2, 2)))
        finally:
            finished.set()  # the task's own cleanup runs when the callback raises

    job = Job(task).start()
    steps = []
    at_cancel = None
    for update in job.updates():
        steps.append(update.step)
        if update.step == 3:
            at_cancel = len(produced)
            job.cancel()
    assert job.cancelled and isinstance(job.error, Cancelled)
    assert finished.is_set() and job.result is None
    assert steps[:3] == [1, 2, 3]
    assert len(produced) <= at_cancel + 1  # the worker stops at its next step after the cancel


def test_model_slot_keeps_one_model_and_frees_the_old(tiny_sd15_dir):
    slot = ModelSlot(device="cpu", dtype="fp32")
    first = slot.get(str(tiny_sd15_dir))
    assert slot.get(str(tiny_sd15_dir)) is first  # kept between runs
    unet = weakref.ref(first.unet)
    del first
    other = slot.get(str(tiny_sd15_dir), vae=str(tiny_sd15_dir / "vae"))  # switching loads anew
    gc.collect()
    assert unet() is None  # the previous weights are gone
    assert slot.model is other


def test_every_model_job_waits_in_one_queue(tmp_path):
    demo = WebUI(model="unused", outputs=tmp_path).build()  # building loads nothing
    device = {f.api_name: f.concurrency_limit for f in demo.fns.values() if f.concurrency_id == DEVICE_QUEUE}
    assert set(device) == {"load", "style", "appearance", "t2i", "texture", "expand", "vae"}
    assert set(device.values()) == {1}


def test_cli_command_quotes_for_the_shell():
    text = cli_command(["t2i"], {"style": "my style.png", "prompt": "a deer's \"forest\"", "lr": 0.015,
                                 "adain": False, "size": None, "grid": True, "steps": 50})
    assert shlex.split(text) == ["attndistill", "t2i", "--style", "my style.png", "--prompt", "a deer's \"forest\"",
                                 "--lr", "0.015", "--no-adain", "--grid", "--steps", "50"]



def test_the_server_says_where_to_open_it_in_the_commands_words(server):
    """Gradio's own start-up lines speak of launch() arguments (share=True); ours of the URL and the results."""
    url, ui = server
    assert f"attndistill: open {url} in a browser" in STARTED["text"]
    assert f"results are saved in {ui.outputs}" in STARTED["text"] and "share=True" not in STARTED["text"]
