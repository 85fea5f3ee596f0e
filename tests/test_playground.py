"""The playground at `/` and the offline API docs, in Debian's headless Chromium against a live Serve app.

The browser cannot resolve any host but 127.0.0.1, so a page that needs a CDN fails here. The server has an
API key configured (the playground must ask for it) and a non-default pixel cap (the docs must state it).
Screenshots go to `test-artifacts/` in the repository root.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Iterator
from urllib.parse import urljoin, urlparse

import httpx
import pytest
import torch
import uvicorn
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from models.pipeline import SRPOPipeline
from server.app import build_app
from server.service import InProcessBackend, SRPOService
from settings import get_settings
from tests.conftest import CPU
from tests.harness import DATA_PLANES, free_port, running_serve, tiny_env, wait_until
from tests.queue_helpers import REQUESTS

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
KEY = "playground-key-9e2b"
MAX_PIXELS = 1280 * 1280  # not the default, so the docs can only have it from the settings
PAGES = ("/", "/docs", "/redoc")
ASSET_REF = re.compile(r"""(?:src|href|spec-url)=["']([^"']+)|url:\s*['"]([^'"]+)""")

@pytest.fixture(scope="module", params=DATA_PLANES)
def server(request, tiny_root, tmp_path_factory) -> Iterator[str]:
    env = tiny_env(tiny_root, tmp_path_factory.mktemp("state"), SRPO_QUEUE_CONCURRENCY="1",
                   SRPO_MAX_PIXELS=str(MAX_PIXELS))
    args = {"text_batch_wait_s": 0.0, "decode_batch_wait_s": 0.0}
    with running_serve(env, args, secrets={"SRPO_API_KEYS": json.dumps([KEY])}, data_plane=request.param) as base:
        yield base


@pytest.fixture(scope="module")
def open_server(tiny_model_dir, tiny_safety_dir, tmp_path_factory) -> Iterator[str]:
    """The same app with no API keys, in-process under uvicorn (no Ray: only its pages are looked at)."""
    state = tmp_path_factory.mktemp("open")
    settings = get_settings().model_copy(update={"api_keys": [], "storage_dir": state / "files",
                                                 "queue_db_path": state / "requests.sqlite3"})
    app = build_app(SRPOService(InProcessBackend(SRPOPipeline(tiny_model_dir, tiny_safety_dir, CPU, torch.float32)),
                                settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 60, "uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[WebDriver]:
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), \
        "needs Debian's chromium and chromium-driver (scripts/dev test installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1800", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers={"Authorization": f"Key {KEY}"}, timeout=30) as client:
        yield client


def screenshot(driver: WebDriver, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")  # the status and progress, not the last-focused field
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def wait(driver: WebDriver, condition, timeout_s: float = 60, what: str = ""):
    return WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(condition, what)


def offsite_requests_and_errors(driver: WebDriver, base: str) -> tuple[list[str], list[str]]:
    """Requests the page sent toward another host, and its console errors.

    A request the page's Content-Security-Policy refused never left the browser: it is not counted, nor is
    the console's note of the refusal (ReDoc's sidebar logo from its CDN is one).
    """
    console = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    refused = [message for message in console if "Content Security Policy" in message]
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    offsite = [name for name in names if not name.startswith(base) and not any(name in m for m in refused)]
    return offsite, [message for message in console if message not in refused]


# --------------------------------------------------------------------------- without a browser

def test_every_asset_of_the_pages_is_served_by_the_app_without_a_key(server):
    with httpx.Client(timeout=30) as anonymous:  # the pages load before the user has typed a key
        for page in PAGES:
            response = anonymous.get(f"{server}{page}")
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
            refs = [a or b for a, b in ASSET_REF.findall(response.text)]
            assert refs, page
            for ref in refs:
                url = urljoin(f"{server}{page}", ref)
                assert urlparse(url).netloc == urlparse(server).netloc, (page, ref)  # never another host
                asset = anonymous.get(url)
                assert asset.status_code == 200 and asset.content, (page, ref, asset.status_code)
                if ref.endswith((".js", ".css")):  # the playground's own code names no other host either
                    assert not (page == "/" and re.search(rb"https?://", asset.content)), ref
        assert anonymous.get(f"{server}/playground/config").json() == {"api_key_required": True,
                                                                       "max_pixels": MAX_PIXELS, "tiny_preset": True}
        assert anonymous.post(f"{server}/queue/fal-ai/flux/srpo", json={"prompt": "x"}).status_code == 401


def test_the_openapi_schema_states_the_pixel_cap_and_has_examples(server):
    schemas = httpx.get(f"{server}/openapi.json", timeout=30).json()["components"]["schemas"]
    for field in (schemas["ImageSize"]["properties"]["width"], schemas["TextToImageInput"]["properties"]["image_size"]):
        assert f"At most {MAX_PIXELS} pixels" in field["description"]
    assert str(MAX_PIXELS) in schemas["ImageToImageInput"]["properties"]["image_url"]["description"]
    assert schemas["TextToImageInput"]["examples"][0]["prompt"]
    assert schemas["ImageToImageInput"]["examples"][0]["image_url"].startswith("data:image/png;base64,")


# --------------------------------------------------------------------------- the playground

def open_playground(driver: WebDriver, base: str) -> None:
    driver.get(f"{base}/")
    wait(driver, lambda d: d.find_element(By.ID, "generate").is_enabled(), what="the form built from the schema")
    key = driver.find_element(By.ID, "api-key")
    assert key.is_displayed()  # keys are configured
    key.send_keys(KEY)


def field(driver: WebDriver, name: str):
    return driver.find_element(By.CSS_SELECTOR, f'[data-field="{name}"] [name="{name}"]')


def set_value(element, value: str) -> None:
    element.clear()
    element.send_keys(value)


def set_custom_size(driver: WebDriver, width: int, height: int) -> None:
    Select(field(driver, "image_size")).select_by_visible_text("custom")
    set_value(driver.find_element(By.NAME, "image_size.width"), str(width))
    set_value(driver.find_element(By.NAME, "image_size.height"), str(height))


def record_progress(driver: WebDriver) -> None:
    """Note the progress bar's value, and how many images the gallery held then, at every change."""
    driver.execute_script("""
        window.progressSeen = [];
        const bar = document.getElementById('progress');
        new MutationObserver(() => window.progressSeen.push(
            [bar.value, document.querySelectorAll('#gallery img').length])).observe(bar, {attributes: true});
    """)


def gallery_count(driver: WebDriver) -> int:
    return len(driver.find_elements(By.CSS_SELECTOR, "#gallery figure.result"))


def displayed(driver: WebDriver) -> dict[str, bool]:
    """What a user sees of the parts the page shows or hides (CSS included, not only `hidden`)."""
    return {
        "api key": driver.find_element(By.ID, "api-key-field").is_displayed(),
        "custom size": driver.find_element(By.CSS_SELECTOR, ".custom-size").is_displayed(),
        "tiny notice": driver.find_element(By.ID, "tiny-notice").is_displayed(),
    }


def test_what_is_displayed_with_keys_and_without(server, open_server, browser):
    for base, key_asked in ((server, True), (open_server, False)):
        browser.get(f"{base}/")
        wait(browser, lambda d: d.find_element(By.ID, "generate").is_enabled(), what="the form built from the schema")
        assert Select(field(browser, "image_size")).first_selected_option.text == "landscape_4_3"
        assert displayed(browser) == {"api key": key_asked, "custom size": False, "tiny notice": True}, base
        assert "noise images" in browser.find_element(By.ID, "tiny-notice").text
        Select(field(browser, "image_size")).select_by_visible_text("custom")
        assert displayed(browser)["custom size"]
        screenshot(browser, f"playground-{'with' if key_asked else 'without'}-keys")


def test_the_form_follows_the_schema(server, browser):
    open_playground(browser, server)
    steps = field(browser, "num_inference_steps")
    assert (steps.get_attribute("min"), steps.get_attribute("max"), steps.get_attribute("value")) == ("1", "50", "28")
    sizes = [o.get_attribute("value") for o in Select(field(browser, "image_size")).options]
    assert sizes == ["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9", ""]
    assert Select(field(browser, "image_size")).first_selected_option.text == "landscape_4_3"
    assert [o.text for o in Select(field(browser, "acceleration")).options] == ["none", "regular", "high"]
    assert field(browser, "enable_safety_checker").is_selected()
    assert f"At most {MAX_PIXELS} pixels" in browser.find_element(By.CSS_SELECTOR, '[data-field="image_size"]').text

    Select(browser.find_element(By.ID, "endpoint")).select_by_value("/fal-ai/flux/srpo/image-to-image")
    steps = field(browser, "num_inference_steps")
    assert (steps.get_attribute("min"), steps.get_attribute("value")) == ("10", "40")
    assert field(browser, "strength").get_attribute("value") == "0.95"
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-field="image_size"]')


def test_generate_shows_progress_logs_and_the_image(server, browser, http):
    open_playground(browser, server)
    set_value(field(browser, "prompt"), "a lighthouse at dusk")
    set_custom_size(browser, 256, 256)
    set_value(field(browser, "num_inference_steps"), "8")
    set_value(field(browser, "seed"), "1234")
    record_progress(browser)
    browser.find_element(By.ID, "generate").click()

    figure = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#gallery figure.result"), what="a result")
    wait(browser, lambda d: d.execute_script("return arguments[0].querySelector('img').naturalWidth", figure) > 0,
         what="the image to load")
    screenshot(browser, "playground-generated")
    seen = browser.execute_script("return window.progressSeen")
    assert any(value > 0 and images == 0 for value, images in seen), seen  # it moved before the result came
    assert browser.find_element(By.ID, "progress").get_attribute("value") == "1"
    assert "step 8/8" in browser.find_element(By.ID, "logs").text
    assert browser.find_element(By.ID, "status").text.startswith("Done")

    output = http.get(f"{REQUESTS}/{figure.get_attribute('data-request-id')}").json()
    image = output["images"][0]
    assert figure.find_element(By.TAG_NAME, "img").get_attribute("src") == image["url"]
    assert figure.find_element(By.CLASS_NAME, "seed").text == "seed 1234" and output["seed"] == 1234
    flagged = output["has_nsfw_concepts"][0]
    assert figure.find_element(By.CLASS_NAME, "nsfw").text == f"NSFW: {'yes (blacked out)' if flagged else 'no'}"
    download = figure.find_element(By.CLASS_NAME, "download")
    assert (download.get_attribute("href"), download.get_attribute("download")) == (image["url"], image["file_name"])
    assert offsite_requests_and_errors(browser, server) == ([], [])


def test_image_to_image_from_an_uploaded_file(server, browser, tmp_path):
    source = tmp_path / "source.png"
    Image.new("RGB", (96, 64), (30, 120, 200)).save(source)
    open_playground(browser, server)
    before = gallery_count(browser)
    Select(browser.find_element(By.ID, "endpoint")).select_by_value("/fal-ai/flux/srpo/image-to-image")
    set_value(field(browser, "prompt"), "as a watercolour")
    browser.find_element(By.CSS_SELECTOR, '[data-field="image_url"] input[type=file]').send_keys(str(source))
    wait(browser, lambda d: field(d, "image_url").get_attribute("value").startswith("data:image/png;base64,"),
         what="the upload as a data URI")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: gallery_count(d) == before + 1, what="the image-to-image result")
    screenshot(browser, "playground-image-to-image")
    assert "96×64" in browser.find_element(By.CSS_SELECTOR, "#gallery figure.result figcaption").text


def test_cancel_marks_a_long_request_cancelled(server, browser, http):
    open_playground(browser, server)
    before = gallery_count(browser)
    set_value(field(browser, "prompt"), "a long one")
    set_custom_size(browser, 1024, 1024)
    set_value(field(browser, "num_inference_steps"), "50")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: float(d.find_element(By.ID, "progress").get_attribute("value")) > 0,
         what="the request to be running")
    browser.find_element(By.ID, "cancel").click()
    status = wait(browser, lambda d: (s := d.find_element(By.ID, "status")).text == "Cancelled" and s,
                  what="the request marked cancelled")
    screenshot(browser, "playground-cancelled")
    assert "cancelled" in status.get_attribute("class")
    assert gallery_count(browser) == before
    assert float(browser.find_element(By.ID, "progress").get_attribute("value")) < 1
    assert browser.find_element(By.ID, "generate").is_enabled()


# --------------------------------------------------------------------------- offline API docs

def test_swagger_ui_and_redoc_render_with_no_other_host(server, browser):
    browser.get(f"{server}/docs")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 4, what="Swagger's operations")
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/fal-ai/flux/srpo", "/fal-ai/flux/srpo/image-to-image", "/queue/fal-ai/flux/srpo"} <= paths
    screenshot(browser, "docs-swagger")
    assert offsite_requests_and_errors(browser, server) == ([], [])

    browser.get(f"{server}/redoc")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-section-id^="operation/"]'),
         what="ReDoc's operations")
    assert "Text to image" in browser.find_element(By.TAG_NAME, "body").text
    screenshot(browser, "docs-redoc")
    assert offsite_requests_and_errors(browser, server) == ([], [])
