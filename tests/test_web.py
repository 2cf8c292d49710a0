"""The web page in a real headless Chromium (Debian's package, driven by Playwright): upload a photo
and see its label, toggle the heat map, upload a non-image and read the error.

`.ci/run` installs Chromium; elsewhere the test is skipped when it is missing. With
VISIONZOO_SCREENSHOT=PATH the page is saved there (the README's screenshot)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from visionzoo.runtime.backends import open_runner
from visionzoo.tasks.serve import ServeSettings, start_server

IMAGES = Path(__file__).parent.parent / "examples" / "images"
CHROMIUM = "/usr/bin/chromium"
# as root, on a machine with no network: no sandbox, no GPU, no background connections (Playwright adds
# --headless and a new, empty profile itself)
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not os.environ.get("CI"):  # CI installs both: there, a missing one is a failure
        if not Path(CHROMIUM).exists():
            pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it)")
        pytest.importorskip("playwright.sync_api")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server():
    # (a module's runner is opened before the autouse fixture turns auto's measuring off: both forced)
    runner = open_runner("efficientnet_lite0", "torch", precision="fp32")
    with start_server(runner, settings=ServeSettings(max_batch=4)) as srv:
        yield srv


def test_upload_see_label_toggle_heat_map_and_read_errors(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("#status.ready", timeout=60_000)
    assert page.text_content("#model-name") == "efficientnet_lite0"
    card = page.text_content("#card-fields")
    assert "efficientnet_lite0.IMAGENET1K" in card and "resize 256, crop 224" in card and "top-1" in card

    page.set_input_files("#file-input", str(IMAGES / "coffee.png"))
    first = page.wait_for_selector(".result.done .bars li:first-child .label", timeout=60_000)
    assert first.text_content() == "espresso"
    assert len(page.query_selector_all(".result.done .bars li")) == 5

    page.check("#explain-toggle")
    page.wait_for_selector(".result.explained .heatmap", state="visible", timeout=120_000)
    assert page.eval_on_selector(".result.explained .heatmap", "img => img.naturalWidth") == 600
    assert "espresso" in page.text_content(".result.explained .explain-note")
    if os.environ.get("VISIONZOO_SCREENSHOT"):
        page.screenshot(path=os.environ["VISIONZOO_SCREENSHOT"], full_page=False)
    page.uncheck("#explain-toggle")
    assert page.is_hidden(".result.explained .heatmap")

    notes = tmp_path / "notes.txt"
    notes.write_text("this is a shopping list, not a photo\n")
    page.set_input_files("#file-input", str(notes))
    error = page.wait_for_selector(".result.failed .error", timeout=60_000)
    assert "not a readable image" in error.text_content()
    assert page.text_content(".result.failed .file-name") == "notes.txt"
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    assert not errors, errors
    page.close()


def test_camera_button_only_where_the_browser_offers_a_camera(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/")
    has_camera = page.evaluate("() => !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia)")
    assert page.is_visible("#camera-button") == has_camera
    page.close()

