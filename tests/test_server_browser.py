"""The web page at `/` in real headless Chromium against a real uvicorn process: upload an image, see the
caption's words drawn on it, hover a word, drag a box, localize a text; a screenshot lands in tests/artifacts/."""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from server_helpers import (
    ROOT,
    ServerProcess,
    encode,
    exif_after_pixels,
    exif_turned,
    png,
    random_image,
    settings_env,
)

pytest_plugins = ["server_fixtures"]

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
MISSING = "needs Debian chromium and chromium-driver on PATH (make browser-deps, as root)"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")  # .ci/run sets it: there the tests must run
needs_chromium = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER) and not IN_CI, reason=MISSING)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)
ARTIFACTS = Path(__file__).parent / "artifacts"
LOCALIZE_COLOR, DOT_RADIUS = "#e0007a", 5  # as in server/static/app.js
# An image the random test model was chosen on (server_helpers.MAKE_MODEL): its captions have words.
W, H = 128, 96
IMAGE = encode(Image.fromarray(np.random.RandomState(0).randint(0, 255, (H, W, 3), dtype=np.uint8)))
TOKENS = "8"
WAIT_S = 60
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="40" height="30"><rect width="40" height="30" fill="red"/></svg>'


def test_page_and_static_files_are_served(service_client: httpx.Client) -> None:
    page = service_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<canvas id="overlay"' in page.text and 'src="static/app.js"' in page.text
    assert page.headers["cache-control"] == "no-cache"  # revalidated: an upgrade never mixes page and script
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        response = service_client.get(path)
        assert response.status_code == 200 and kind in response.headers["content-type"]
        assert response.headers["cache-control"] == "no-cache", path
        again = service_client.get(path, headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304 and again.headers["cache-control"] == "no-cache", path
    assert "/" not in service_client.get("/openapi.json").json()["paths"]


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail(f"CI is set, so the web page must be tested: {MISSING}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield browser
    browser.quit()


def overlay_pixels(driver) -> np.ndarray:
    """The overlay canvas as an HxWx4 uint8 array (RGBA, not premultiplied)."""
    url = driver.execute_script("return document.getElementById('overlay').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert("RGBA"))


def color_mask(pixels: np.ndarray, color: str, alpha: tuple[int, int] = (255, 255), tol: int = 30) -> np.ndarray:
    rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    close = np.abs(pixels[..., :3].astype(int) - rgb).sum(-1) <= tol
    return close & (pixels[..., 3] >= alpha[0]) & (pixels[..., 3] <= alpha[1])


def canvas_box(box: dict, mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`box` (pixels of an image of `size`) in canvas pixels: [x0, y0, x1, y1]."""
    sx, sy = mask.shape[1] / size[0], mask.shape[0] / size[1]
    return np.array([box["x0"] * sx, box["y0"] * sy, box["x1"] * sx, box["y1"] * sy])


def assert_drawn_at(mask: np.ndarray, box: dict, point: dict | None, size: tuple[int, int], unit: float) -> None:
    """What `mask` marks spans exactly `box` and the dot at `point` (image pixels), within 3 canvas pixels."""
    ys, xs = np.nonzero(mask)
    assert xs.size, "nothing drawn"
    expected = canvas_box(box, mask, size)
    if point is not None:
        dot = canvas_box({"x0": point["x"], "y0": point["y"], "x1": point["x"], "y1": point["y"]}, mask, size)
        radius = DOT_RADIUS * unit
        expected = np.concatenate(
            [np.minimum(expected[:2], dot[:2] - radius), np.maximum(expected[2:], dot[2:] + radius)]
        )
    height, width = mask.shape
    expected = np.clip(expected, 0, [width - 1, height - 1, width - 1, height - 1])
    drawn = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
    assert np.abs(drawn - expected).max() <= 3, f"drawn at {drawn}, expected {expected.round(1)}"


def outline_drawn(mask: np.ndarray, box: dict, size: tuple[int, int], reach: int = 2) -> float:
    """The fraction of points along `box`'s edges, where inside the canvas, with a marked pixel nearby."""
    x0, y0, x1, y1 = canvas_box(box, mask, size)
    t = np.linspace(0, 1, 25)
    xs = np.concatenate([x0 + t * (x1 - x0), x0 + t * (x1 - x0), np.full_like(t, x0), np.full_like(t, x1)])
    ys = np.concatenate([np.full_like(t, y0), np.full_like(t, y1), y0 + t * (y1 - y0), y0 + t * (y1 - y0)])
    height, width = mask.shape
    hits = [
        mask[max(int(y) - reach, 0) : int(y) + reach + 1, max(int(x) - reach, 0) : int(x) + reach + 1].any()
        for x, y in zip(xs, ys)
        if 0 <= x < width and 0 <= y < height
    ]
    assert hits, f"box {box} is outside the image"
    return float(np.mean(hits))


def wait_for_answer(driver, previous: str) -> None:
    """Until the page has shown a new answer (its timings changed) and is idle again."""
    from selenium.webdriver.support.ui import WebDriverWait

    def answered(d) -> bool:
        error = d.find_element("id", "error")
        assert not error.is_displayed(), error.text
        status = d.find_element("id", "status").text
        return status.endswith("ms.") and d.find_element("id", "timings").text != previous

    WebDriverWait(driver, WAIT_S).until(answered)


def hover(driver, element) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).move_to_element(element).perform()


def unit(driver, pixels: np.ndarray) -> float:
    """Canvas pixels per CSS pixel."""
    return pixels.shape[1] / driver.find_element("id", "overlay").size["width"]


def open_page(driver, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/")
    WebDriverWait(driver, WAIT_S).until(lambda d: "ready" in d.find_element("id", "ready").text)
    tokens = driver.find_element("id", "max-tokens")
    tokens.clear()
    tokens.send_keys(TOKENS)


def upload(driver, path: Path, data: bytes) -> None:
    path.write_bytes(data)
    driver.find_element("id", "file").send_keys(str(path))
    wait_for_answer(driver, previous="")


@pytest.mark.browser
@needs_chromium
def test_upload_caption_hover_box_localize(driver, service, service_client: httpx.Client, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    # Upload: the page captions the whole image and draws every word's point faintly.
    open_page(driver, service.url)
    upload(driver, tmp_path / "upload.png", IMAGE)
    expected = service_client.post("/v1/caption", files={"image": IMAGE}, data={"max_new_tokens": TOKENS}).json()
    assert len(expected["words"]) >= 2, expected
    assert driver.find_element("id", "caption").text == expected["caption"]
    spans = driver.find_elements("css selector", "#caption .word")
    assert [s.text for s in spans] == [w["text"] for w in expected["words"]]
    pixels = overlay_pixels(driver)
    assert not (pixels[..., 3] == 255).any(), "nothing should be drawn at full strength before a hover"
    scale = pixels.shape[1] / W
    for word in expected["words"]:  # a faint dot at each word's point (the random model's dots overlap, blending
        # their colors: each word's color is checked on hover)
        x = min(round(word["point"]["x"] * scale), pixels.shape[1] - 1)  # a point on the image's edge
        y = min(round(word["point"]["y"] * scale), pixels.shape[0] - 1)
        assert pixels[y, x, 3] >= 80, f"no point for {word}"

    # Hover each word: its box and point are drawn in its color, where the API put them; leaving clears them.
    for word, span in zip(expected["words"], spans):
        hover(driver, span)
        assert "active" in span.get_attribute("class")
        pixels = overlay_pixels(driver)
        drawn = color_mask(pixels, span.get_attribute("data-color"))
        assert_drawn_at(drawn, word["box"], word["point"], (W, H), unit(driver, pixels))
    hover(driver, driver.find_element("tag name", "h1"))
    assert not (overlay_pixels(driver)[..., 3] == 255).any()

    # Localize a text: its box is drawn, and its mask blended where the API's mask is (before a dragged box is
    # drawn over it: the random model's boxes are near the image's middle, where the dragged box's edge is).
    text = "the red square"
    body = {"image": base64.b64encode(IMAGE).decode(), "text": text, "mask": True, "mask_format": "png"}
    (loc,) = service_client.post("/v1/localize", json=body).json()["results"]
    previous = driver.find_element("id", "timings").text
    driver.find_element("id", "localize-text").send_keys(text)
    driver.find_element("id", "localize-btn").click()
    wait_for_answer(driver, previous)
    assert driver.find_element("id", "localization").text.startswith(text)
    pixels = overlay_pixels(driver)
    assert_drawn_at(color_mask(pixels, LOCALIZE_COLOR), loc["box"], None, (W, H), unit(driver, pixels))
    api_mask = Image.open(io.BytesIO(base64.b64decode(loc["mask"]["png"])))
    api_mask = np.asarray(api_mask.resize(pixels.shape[1::-1], Image.NEAREST)) > 127
    assert api_mask.any()
    blended = color_mask(pixels, LOCALIZE_COLOR, alpha=(90, 130))
    assert (blended & api_mask).sum() / (blended | api_mask).sum() > 0.9

    # Drag a box on the image: the region is captioned and the box stays drawn.
    overlay = driver.find_element("id", "overlay")
    size = overlay.size
    start = (8 * size["width"] / W - size["width"] / 2, 8 * size["height"] / H - size["height"] / 2)
    drag = (56 * size["width"] / W, 72 * size["height"] / H)
    previous = driver.find_element("id", "timings").text
    actions = ActionChains(driver).move_to_element_with_offset(overlay, *map(round, start)).click_and_hold()
    actions.move_by_offset(*map(round, drag)).release().perform()
    wait_for_answer(driver, previous)
    assert driver.find_element("id", "clear-box").is_enabled()
    spans = driver.find_elements("css selector", "#caption .word")
    assert len(spans) >= 2
    opaque = overlay_pixels(driver)[..., 3] == 255  # the dragged box, white and dashed black
    assert outline_drawn(opaque, {"x0": 8, "y0": 8, "x1": 64, "y1": 80}, (W, H)) >= 0.95

    hover(driver, spans[1])
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / "web_page.png"))
    assert driver.get_log("browser") == []


@pytest.mark.browser
@needs_chromium
def test_the_api_docs_render_from_the_services_own_files(driver, service) -> None:
    """Swagger UI at /docs lists the endpoints, and every file the page loaded came from the service (no CDN: the
    docs work without internet access)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{service.url}/docs")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements("css selector", ".opblock-summary-path"))
    paths = {e.get_attribute("data-path") for e in driver.find_elements("css selector", ".opblock-summary-path")}
    assert {"/v1/caption", "/v1/localize", "/v1/regions", "/v1/dense"} <= paths, paths
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(url.endswith("/openapi.json") for url in loaded), loaded
    assert all(url.startswith(service.url) for url in loaded), loaded


@pytest.mark.browser
@needs_chromium
def test_dense_captions_listed_and_drawn(driver, service, service_client: httpx.Client, tmp_path: Path) -> None:
    open_page(driver, service.url)
    upload(driver, tmp_path / "dense.png", IMAGE)
    threshold = driver.find_element("id", "dense-threshold")
    threshold.clear()
    threshold.send_keys("0")
    fields = {"max_new_tokens": TOKENS, "score_threshold": "0"}
    expected = service_client.post("/v1/dense", files={"image": IMAGE}, data=fields).json()["regions"]
    assert expected
    previous = driver.find_element("id", "timings").text
    driver.find_element("id", "dense-btn").click()
    wait_for_answer(driver, previous)
    items = driver.find_elements("css selector", "#regions li")
    assert [i.text for i in items] == [f"{r['caption']} ({r['score']:.2f})" for r in expected]
    # each region's box outlined in its color (a region drawn later may cover it where their edges meet,
    # e.g. two boxes along the image border); hovering one draws it thicker
    pixels = overlay_pixels(driver)
    masks = [color_mask(pixels, item.get_attribute("data-color")) for item in items]
    for k, region in enumerate(expected):
        drawn = np.logical_or.reduce(masks[k:])
        assert outline_drawn(drawn, region["box"], (W, H)) >= 0.8, region
    hover(driver, items[0])
    assert "active" in items[0].get_attribute("class")
    thick = color_mask(overlay_pixels(driver), items[0].get_attribute("data-color")).sum()
    hover(driver, driver.find_element("tag name", "h1"))
    assert thick > color_mask(overlay_pixels(driver), items[0].get_attribute("data-color")).sum()
    assert driver.get_log("browser") == []


SAMPLE_SIZE = (578, 530)

# One consistent snapshot of the page (one JavaScript turn): status, caption words, their colors, the overlay.
SNAPSHOT_JS = """
const spans = [...document.querySelectorAll("#caption .word")];
return {
  status: document.getElementById("status").textContent,
  words: spans.map((span) => span.textContent),
  colors: spans.map((span) => span.dataset.color),
  overlay: document.getElementById("overlay").toDataURL("image/png"),
};
"""


def start_sample_caption(driver, url: str, tmp_path: Path) -> dict:
    """The service's caption of the sample image, asked directly; then the page opened and the sample uploaded,
    not waiting for its answer."""
    sample = (ROOT / "assets" / "sample.jpg").read_bytes()
    assert Image.open(io.BytesIO(sample)).size == SAMPLE_SIZE
    expected = httpx.post(
        f"{url}/v1/caption", files={"image": sample}, data={"max_new_tokens": TOKENS}, timeout=60
    ).json()
    open_page(driver, url)
    (tmp_path / "sample.jpg").write_bytes(sample)
    driver.find_element("id", "file").send_keys(str(tmp_path / "sample.jpg"))
    return expected


@pytest.mark.browser
@needs_chromium
def test_words_and_markers_appear_live(driver, slow_stream_service, tmp_path: Path) -> None:
    """The caption streams in: its words, and their points on the image, appear one by one while the model
    decodes (here every word takes 0.25 s more), and the page ends with the service's caption."""
    from selenium.webdriver.support.ui import WebDriverWait

    expected = start_sample_caption(driver, slow_stream_service.url, tmp_path)
    live = []  # each new state of the caption while the answer streams in
    WebDriverWait(driver, WAIT_S).until(lambda d: "Caption" in d.find_element("id", "status").text)
    snapshot = driver.execute_script(SNAPSHOT_JS)
    while not snapshot["status"].endswith("ms."):
        if snapshot["words"] and (not live or snapshot["words"] != live[-1]["words"]):
            live.append(snapshot)
        snapshot = driver.execute_script(SNAPSHOT_JS)
    assert not driver.find_element("id", "error").is_displayed()
    final = [w["text"] for w in expected["words"]]
    assert len(final) >= 4, expected["caption"]
    assert len(live) >= 3, [state["words"] for state in live]  # several states seen, not only the final one
    for state in live:
        n = len(state["words"])
        assert state["words"] == final[:n]
        assert state["status"].startswith("Caption") and state["status"].endswith(f"{n} word{'s' * (n > 1)}")
        png_bytes = base64.b64decode(state["overlay"].partition(",")[2])
        alpha = np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGBA"))[..., 3].astype(int)
        state["ink"] = alpha.sum()
        scale = alpha.shape[1] / SAMPLE_SIZE[0]
        for word in expected["words"][:n]:  # a faint dot at each word's point (the words' dots may overlap)
            x, y = round(word["point"]["x"] * scale), round(word["point"]["y"] * scale)
            assert alpha[y, x] >= 80, f"no point for {word['text']!r} in {state['words']}"
    assert [len(state["words"]) for state in live] == sorted({len(state["words"]) for state in live})
    ink = [state["ink"] for state in live]
    assert ink == sorted(set(ink)), ink  # each new word adds its marker
    assert driver.find_element("id", "caption").text == expected["caption"]
    assert [s.text for s in driver.find_elements("css selector", "#caption .word")] == final
    assert driver.get_log("browser") == []


@pytest.mark.browser
@needs_chromium
def test_a_box_dragged_while_a_caption_streams_is_not_taken(driver, slow_stream_service, tmp_path: Path) -> None:
    """While busy the page takes no box: one drawn then would sit beside a caption that is not of it."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    expected = start_sample_caption(driver, slow_stream_service.url, tmp_path)
    WebDriverWait(driver, WAIT_S).until(lambda d: "word" in d.find_element("id", "status").text)  # streaming
    overlay = driver.find_element("id", "overlay")
    size = overlay.size
    actions = ActionChains(driver).move_to_element_with_offset(overlay, -size["width"] // 4, -size["height"] // 4)
    actions.click_and_hold().move_by_offset(size["width"] // 3, size["height"] // 3).release().perform()
    assert not driver.find_element("id", "status").text.endswith("ms."), "the caption ended before the drag"
    wait_for_answer(driver, previous="")
    assert driver.find_element("id", "caption").text == expected["caption"]  # the whole image's
    assert not driver.find_element("id", "clear-box").is_enabled()  # no box was taken
    assert not (overlay_pixels(driver)[..., 3] == 255).any()  # and none is drawn (words are drawn faint)


@pytest.mark.browser
@needs_chromium
def test_a_word_hovered_while_the_caption_streams_stays_active(driver, slow_stream_service, tmp_path: Path) -> None:
    """Each new word rebuilds the caption under the still mouse: the hovered word keeps its box drawn."""
    from selenium.webdriver.support.ui import WebDriverWait

    expected = start_sample_caption(driver, slow_stream_service.url, tmp_path)
    active = "return [...document.querySelectorAll('#caption .word.active')].map((s) => s.dataset.index)"
    first = WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements("css selector", "#caption .word"))[0]
    hover(driver, first)
    # after each rebuild, before any later event (the browser's own hover update comes as one): is a word active?
    driver.execute_script(
        "window.activeAfterRebuild = [];"
        "new MutationObserver(() => window.activeAfterRebuild.push("
        "  document.querySelectorAll('#caption .word.active').length"
        ")).observe(document.getElementById('caption'), {childList: true});"
    )
    count = len(driver.find_elements("css selector", "#caption .word"))
    WebDriverWait(driver, WAIT_S).until(lambda d: len(d.find_elements("css selector", "#caption .word")) >= count + 2)
    assert driver.execute_script(active) == ["0"]
    wait_for_answer(driver, previous="")
    assert driver.execute_script(active) == ["0"]  # and after the final answer
    rebuilds = driver.execute_script("return window.activeAfterRebuild")
    assert len(rebuilds) >= 3 and set(rebuilds) == {1}, rebuilds  # never dropped, even for a moment
    drawn = color_mask(
        overlay_pixels(driver), driver.execute_script(active.replace(".dataset.index", ".dataset.color"))[0]
    )
    assert outline_drawn(drawn, expected["words"][0]["box"], SAMPLE_SIZE) >= 0.8
    hover(driver, driver.find_element("tag name", "h1"))
    assert driver.execute_script(active) == []


@pytest.mark.browser
@needs_chromium
def test_a_word_focused_while_the_caption_streams_keeps_the_focus(driver, slow_stream_service, tmp_path: Path) -> None:
    """Each new word rebuilds the caption: a keyboard user's focused word stays focused and active."""
    from selenium.webdriver.support.ui import WebDriverWait

    start_sample_caption(driver, slow_stream_service.url, tmp_path)
    first = WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements("css selector", "#caption .word"))[0]
    driver.execute_script("arguments[0].focus()", first)
    count = len(driver.find_elements("css selector", "#caption .word"))
    WebDriverWait(driver, WAIT_S).until(lambda d: len(d.find_elements("css selector", "#caption .word")) >= count + 2)
    focused = "return [document.activeElement.dataset.index, document.activeElement.classList.contains('active')]"
    assert driver.execute_script(focused) == ["0", True]
    wait_for_answer(driver, previous="")
    assert driver.execute_script(focused) == ["0", True]


def page_error(driver, contains: str) -> str:
    """Wait until the page shows an error containing `contains`; its text."""
    from selenium.webdriver.support.ui import WebDriverWait

    error = driver.find_element("id", "error")
    WebDriverWait(driver, WAIT_S).until(lambda d: error.is_displayed() and contains in error.text)
    return error.text


def assert_no_image(driver) -> None:
    """The page holds no image: none shown, no answer left, nothing to click but the file picker."""
    assert not driver.find_element("id", "stage").is_displayed()
    assert driver.find_element("id", "caption").text == "" and driver.find_element("id", "timings").text == ""
    assert driver.execute_script("return document.getElementById('file').value") == ""
    for button in ("caption-btn", "dense-btn", "localize-btn", "region-btn", "clear-box"):
        assert not driver.find_element("id", button).is_enabled(), button


@pytest.mark.browser
@needs_chromium
def test_a_file_the_page_cannot_use_is_dropped_not_kept_beside_the_last(driver, service, tmp_path: Path) -> None:
    """A file the browser cannot show, or one the service refuses (an SVG shows, and is a 415), leaves no image on
    the page: not the one before it, answered as if it were the one chosen."""
    open_page(driver, service.url)
    for name, data, message in (
        ("notes.txt", b"not an image", "This browser cannot display that file"),
        ("drawing.svg", SVG, "unsupported_media_type"),
    ):
        upload(driver, tmp_path / "first.png", IMAGE)
        (tmp_path / name).write_bytes(data)
        driver.find_element("id", "file").send_keys(str(tmp_path / name))
        page_error(driver, message)
        assert_no_image(driver)
    assert "(choose another image)" in driver.find_element("id", "error").text


@pytest.mark.browser
@needs_chromium
def test_a_new_image_clears_the_error_about_the_last_while_the_model_loads(
    driver, random_tiny_dir: Path, tmp_path: Path
) -> None:
    """An upload made while the model loads waits for it, and the error about the file before it goes at once
    (it stayed under the new image until the model was ready)."""
    from selenium.webdriver.support.ui import WebDriverWait

    server = ServerProcess(settings_env(random_tiny_dir, debug_load_delay_ms=30000), tmp_path / "server.log")
    try:
        server.wait_ready(timeout_s=120, path="/healthz")  # live, the model held back
        driver.get(f"{server.url}/")
        (tmp_path / "notes.txt").write_bytes(b"not an image")
        driver.find_element("id", "file").send_keys(str(tmp_path / "notes.txt"))
        page_error(driver, "This browser cannot display that file")
        (tmp_path / "upload.png").write_bytes(IMAGE)
        driver.find_element("id", "file").send_keys(str(tmp_path / "upload.png"))
        WebDriverWait(driver, WAIT_S).until(lambda d: "Waiting for the model" in d.find_element("id", "status").text)
        assert not driver.find_element("id", "error").is_displayed()
        assert httpx.get(f"{server.url}/readyz").status_code == 503  # all of it happened before the model was ready
    finally:
        server.stop()


def model_requests(client: httpx.Client) -> float:
    """Requests the service has counted on its model routes (/v1/...), any status."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(client.get("/metrics").text)
    samples = [s for f in families for s in f.samples if s.name == "pixelllm_requests_total"]
    return sum(s.value for s in samples if s.labels["route"].startswith("/v1/"))


@pytest.mark.browser
@needs_chromium
def test_an_image_over_the_services_body_limit_is_refused_before_it_is_sent(
    driver, service, service_client: httpx.Client, tmp_path: Path
) -> None:
    """The page reads the limit from /readyz: a file over it gets the sizes, not a reset connection's message."""
    from server_fixtures import MAIN_SETTINGS

    big = encode(Image.fromarray(np.random.RandomState(3).randint(0, 255, (900, 900, 3), dtype=np.uint8)))
    assert len(big) > MAIN_SETTINGS["max_body_bytes"]
    open_page(driver, service.url)
    sent = model_requests(service_client)
    (tmp_path / "big.png").write_bytes(big)
    driver.find_element("id", "file").send_keys(str(tmp_path / "big.png"))
    error = page_error(driver, "this service takes at most 1.91 MiB per request, form fields included")
    assert error.startswith(f"the image is {len(big) / 2**20:.2f} MiB;") and error.endswith("(choose another image)")
    assert_no_image(driver)
    assert model_requests(service_client) == sent


@pytest.mark.browser
@needs_chromium
def test_inputs_the_page_cannot_send_say_so(driver, service, tmp_path: Path) -> None:
    """Spaces as the text to find, and a number field the browser cannot read (it reports ""), are errors, not
    silently nothing or the default."""
    open_page(driver, service.url)
    upload(driver, tmp_path / "inputs.png", IMAGE)
    driver.find_element("id", "localize-text").send_keys("   ")
    driver.find_element("id", "localize-btn").click()
    page_error(driver, "Type a text to find")
    tokens = driver.find_element("id", "max-tokens")
    tokens.clear()
    tokens.send_keys("e")
    driver.find_element("id", "caption-btn").click()
    page_error(driver, "Max tokens: not a number")
    assert driver.find_element("id", "status").text == "Caption failed."
    assert driver.find_element("id", "caption-btn").is_enabled()  # the image is kept: only the field is wrong


@pytest.mark.browser
@needs_chromium
def test_a_region_caption_that_fails_puts_back_the_caption_shown_and_its_box(driver, service, tmp_path: Path) -> None:
    """A box dragged, then refused by the service: the page shows the whole image's caption again, with no box,
    not the new box beside the old caption."""
    from selenium.webdriver.common.action_chains import ActionChains

    open_page(driver, service.url)
    upload(driver, tmp_path / "region.png", IMAGE)
    whole = driver.find_element("id", "caption").text
    tokens = driver.find_element("id", "max-tokens")
    tokens.clear()
    tokens.send_keys("500")  # over the service's 128: a 422 for this request
    overlay = driver.find_element("id", "overlay")
    size = overlay.size
    actions = ActionChains(driver).move_to_element_with_offset(overlay, -size["width"] // 4, -size["height"] // 4)
    actions.click_and_hold().move_by_offset(size["width"] // 3, size["height"] // 3).release().perform()
    page_error(driver, "max_new_tokens")
    assert driver.find_element("id", "status").text == "Caption failed."
    assert driver.find_element("id", "caption").text == whole
    assert not driver.find_element("id", "clear-box").is_enabled()  # no box kept
    assert not (overlay_pixels(driver)[..., 3] == 255).any()  # and none drawn (words are drawn faint)


@pytest.mark.browser
@needs_chromium
def test_a_region_typed_as_numbers_is_captioned_and_a_dragged_one_fills_them_in(
    driver, service, service_client: httpx.Client, tmp_path: Path
) -> None:
    """From the keyboard, or for an exact box: four numbers in the region field and Enter caption that box as
    the API does; numbers that are no box say why and send nothing; a dragged box shows its numbers there."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    open_page(driver, service.url)
    upload(driver, tmp_path / "typed.png", IMAGE)
    field = driver.find_element("id", "region-box")
    previous = driver.find_element("id", "timings").text
    field.send_keys("8, 8  64,80", Keys.ENTER)
    wait_for_answer(driver, previous)
    box = {"box": "8,8,64,80", "max_new_tokens": TOKENS}
    expected = service_client.post("/v1/caption", files={"image": IMAGE}, data=box).json()
    assert driver.find_element("id", "caption").text == expected["caption"]
    assert field.get_attribute("value") == "8, 8, 64, 80"
    assert driver.find_element("id", "clear-box").is_enabled()
    opaque = overlay_pixels(driver)[..., 3] == 255
    assert outline_drawn(opaque, {"x0": 8, "y0": 8, "x1": 64, "y1": 80}, (W, H)) >= 0.95

    answered = driver.find_element("id", "timings").text
    done = driver.find_element("id", "status").text
    for typed in ("64, 8, 8, 80", "8, 8, 64", "0, 0, 129, 96", "a, b, c, d", "0, 0, 0.04, 0.04"):
        field.clear()
        field.send_keys(typed, Keys.ENTER)
        error = page_error(driver, "Region:")
        assert f"x0, y0, x1, y1 in pixels of the {W} x {H} image, with x0 < x1 and y0 < y1" in error, typed
        assert driver.find_element("id", "status").text == done  # no request began (it says "Caption…" at once)
        driver.execute_script("document.getElementById('error').hidden = true")
    field.clear()
    field.send_keys("1, 2, 3, 4")  # typed, not sent: the caption of the box shown is asked for
    driver.find_element("id", "caption-btn").click()
    wait_for_answer(driver, answered)
    assert field.get_attribute("value") == "8, 8, 64, 80"
    answered = driver.find_element("id", "timings").text

    overlay = driver.find_element("id", "overlay")
    size = overlay.size
    previous = answered
    start = (16 * size["width"] / W - size["width"] / 2, 24 * size["height"] / H - size["height"] / 2)
    actions = ActionChains(driver).move_to_element_with_offset(overlay, *map(round, start)).click_and_hold()
    actions.move_by_offset(round(80 * size["width"] / W), round(48 * size["height"] / H)).release().perform()
    wait_for_answer(driver, previous)
    dragged = [float(v) for v in field.get_attribute("value").split(", ")]
    assert np.allclose(dragged, [16, 24, 96, 72], atol=1.5), dragged
    driver.find_element("id", "clear-box").click()
    assert field.get_attribute("value") == ""


def touch(driver, kind: str, *points: tuple[float, float]) -> None:
    """A touch event of Chromium's input pipeline (as a finger makes, pointer events included): `points` are the
    fingers down, by id, in CSS pixels of the page."""
    touch_points = [{"x": x, "y": y, "id": i} for i, (x, y) in enumerate(points)]
    driver.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": kind, "touchPoints": touch_points})


@pytest.mark.browser
@needs_chromium
def test_one_finger_drags_a_box_and_a_second_finger_cancels_it(driver, service, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(driver, service.url)
    upload(driver, tmp_path / "touch.png", IMAGE)
    rect = driver.execute_script("return document.getElementById('overlay').getBoundingClientRect().toJSON()")
    at = lambda fx, fy: (rect["left"] + fx * rect["width"], rect["top"] + fy * rect["height"])  # noqa: E731
    timings = driver.find_element("id", "timings").text

    touch(driver, "touchStart", at(0.2, 0.2))  # a pinch: the second finger cancels the box the first began
    touch(driver, "touchMove", at(0.6, 0.6))
    touch(driver, "touchStart", at(0.6, 0.6), at(0.8, 0.3))
    touch(driver, "touchMove", at(0.7, 0.7), at(0.9, 0.4))
    touch(driver, "touchEnd")
    time.sleep(0.5)
    assert (
        driver.find_element("id", "timings").text == timings and not driver.find_element("id", "error").is_displayed()
    )
    assert not driver.find_element("id", "clear-box").is_enabled()  # no box taken
    assert not (overlay_pixels(driver)[..., 3] == 255).any()  # and none drawn

    touch(driver, "touchStart", at(0.2, 0.2))  # one finger: its box is captioned
    touch(driver, "touchMove", at(0.6, 0.6))
    touch(driver, "touchEnd")
    wait_for_answer(driver, previous=timings)
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element("id", "clear-box").is_enabled())


# Replaces the model's words in (streamed) caption answers with two words of known, large boxes (arguments[0]).
KNOWN_WORDS_JS = """
const words = arguments[0];
const realFetch = window.fetch;
const event = (name, data) => `event: ${name}\\ndata: ${JSON.stringify(data)}\\n\\n`;
window.fetch = async (url, init) => {
  const response = await realFetch(url, init);
  if (!String(url).startsWith("v1/caption") || !response.ok) return response;
  const done = JSON.parse((await response.text()).split("event: done\\ndata: ")[1]);
  const body = Object.assign(done, {caption: "big box", words});
  const text = words.map((word) => event("word", word)).join("") + event("done", body);
  return new Response(text, {status: 200, headers: {"content-type": "text/event-stream"}});
};
"""


@pytest.mark.browser
@needs_chromium
@pytest.mark.parametrize("size", [(40, 30), (900, 120), (60, 700)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_boxes_scale_to_any_image_size(driver, service, tmp_path: Path, size: tuple[int, int]) -> None:
    """Word boxes given in image pixels land at the same place on the canvas, whatever the image's shape."""
    width, height = size
    boxes = [(0.1, 0.2, 0.6, 0.9), (0.5, 0.05, 0.95, 0.5)]
    words = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        box = {"x0": x0 * width, "y0": y0 * height, "x1": x1 * width, "y1": y1 * height}
        point = {"x": (box["x0"] + box["x1"]) / 2, "y": (box["y0"] + box["y1"]) / 2}
        norm = {"x0": x0, "y0": y0, "x1": x1, "y1": y1}
        point_norm = {"x": point["x"] / width, "y": point["y"] / height}
        start = 4 * i
        words.append(
            dict(text="big box"[start : start + 3], start=start, end=start + 3, point=point, point_norm=point_norm)
            | dict(box=box, box_norm=norm, score=0.9)
        )
    open_page(driver, service.url)
    driver.execute_script(KNOWN_WORDS_JS, words)
    upload(driver, tmp_path / "image.png", png(width, height, seed=width))
    spans = driver.find_elements("css selector", "#caption .word")
    assert [s.text for s in spans] == ["big", "box"]
    for word, span in zip(words, spans):
        hover(driver, span)
        pixels = overlay_pixels(driver)
        drawn = color_mask(pixels, span.get_attribute("data-color"))
        assert_drawn_at(drawn, word["box"], word["point"], size, unit(driver, pixels))
        assert outline_drawn(drawn, word["box"], size) >= 0.95
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / f"web_page_{width}x{height}.png"))


@pytest.mark.browser
@needs_chromium
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "PNG, EXIF after the pixels", "WEBP"])
def test_page_and_service_agree_on_exif_orientation(driver, service, service_client: httpx.Client, fmt: str) -> None:
    """The page draws an upload as Chromium shows it and the service answers in its own frame: for a file with
    EXIF orientation 6 both frames must be the same, or every box is drawn turned. (Chromium reads a PNG's EXIF
    only before the pixel data.)"""
    data = exif_after_pixels(exif_turned("PNG")) if fmt.endswith("after the pixels") else exif_turned(fmt)
    fmt = fmt.split(",")[0]
    open_page(driver, service.url)
    shown = driver.execute_async_script(
        """const [src, done] = arguments; const image = new Image(); image.src = src;
        image.decode().then(() => done([image.naturalWidth, image.naturalHeight]), (e) => done(String(e)));""",
        f"data:image/{fmt.lower()};base64,{base64.b64encode(data).decode()}",
    )
    answer = service_client.post("/v1/caption", files={"image": data}, data={"max_new_tokens": "1"})
    assert answer.status_code == 200, answer.text
    assert shown == [answer.json()["image"]["width"], answer.json()["image"]["height"]]


PREFIX = "/pixelllm"


@contextmanager
def prefix_proxy(target: str) -> Iterator[tuple[str, list[str]]]:
    """A reverse proxy serving `target` under `PREFIX` (stripped before forwarding), as nginx's
    `location /pixelllm/ { proxy_pass http://service/; }`: its URL, and the paths asked outside the prefix."""
    outside: list[str] = []
    host, port = target.removeprefix("http://").split(":")

    class Handler(http.server.BaseHTTPRequestHandler):
        def forward(self) -> None:
            if not self.path.startswith(f"{PREFIX}/"):
                outside.append(self.path)
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            connection = http.client.HTTPConnection(host, int(port), timeout=WAIT_S)
            connection.request(self.command, self.path.removeprefix(PREFIX), body=body, headers=headers)
            answer = connection.getresponse()
            data = answer.read()
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = forward

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}{PREFIX}", outside
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.browser
@needs_chromium
def test_page_and_docs_work_behind_a_proxy_under_a_path_prefix(
    driver, service, service_client: httpx.Client, tmp_path: Path
) -> None:
    """The page, its API calls and the docs use URLs relative to the page, so a proxy may serve the service
    under a path of its own."""
    from selenium.webdriver.support.ui import WebDriverWait

    expected = service_client.post("/v1/caption", files={"image": IMAGE}, data={"max_new_tokens": TOKENS}).json()
    with prefix_proxy(service.url) as (url, outside):
        open_page(driver, url)
        upload(driver, tmp_path / "prefixed.png", IMAGE)
        assert driver.find_element("id", "caption").text == expected["caption"]
        driver.get(f"{url}/docs")
        WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements("css selector", ".opblock-summary-path"))
    assert outside == []


@pytest.mark.browser
@needs_chromium
def test_a_box_whose_drag_began_before_a_caption_started_is_not_taken(
    driver, slow_stream_service, tmp_path: Path
) -> None:
    """A caption that starts during a drag (the model became ready, or a button was pressed) is not of the box
    released after it: the box is dropped, not shown beside that caption."""
    from selenium.webdriver.common.action_chains import ActionChains

    expected = start_sample_caption(driver, slow_stream_service.url, tmp_path)
    wait_for_answer(driver, previous="")
    answered = driver.find_element("id", "timings").text
    overlay = driver.find_element("id", "overlay")
    size = overlay.size
    actions = ActionChains(driver).move_to_element_with_offset(overlay, -size["width"] // 4, -size["height"] // 4)
    actions.click_and_hold().move_by_offset(size["width"] // 3, size["height"] // 3).perform()
    driver.execute_script("document.getElementById('caption-btn').click()")
    ActionChains(driver).release().perform()
    assert not driver.find_element("id", "status").text.endswith("ms."), "the caption ended before the release"
    assert driver.find_element("id", "region-box").get_attribute("value") == ""
    wait_for_answer(driver, answered)
    assert driver.find_element("id", "caption").text == expected["caption"]  # the whole image's
    assert driver.find_element("id", "region-box").get_attribute("value") == ""
    assert not driver.find_element("id", "clear-box").is_enabled()
    assert not (overlay_pixels(driver)[..., 3] == 255).any()


@pytest.mark.browser
@needs_chromium
def test_a_drag_of_a_few_screen_pixels_is_no_box(driver, service, tmp_path: Path) -> None:
    """On a wide photo shown small, 1% of its short side is under a screen pixel: a shaky click is still no box,
    while a drag of 20 CSS pixels is one."""
    from selenium.webdriver.common.action_chains import ActionChains

    width, height = 4000, 400
    open_page(driver, service.url)
    upload(driver, tmp_path / "wide.jpg", encode(random_image(width, height, seed=3), "JPEG"))
    overlay = driver.find_element("id", "overlay")
    assert width / overlay.size["width"] > 3  # the image is shown at most a third of its size
    answered = driver.find_element("id", "timings").text
    for offset in (3, 20):
        ActionChains(driver).move_to_element(overlay).click_and_hold().move_by_offset(
            offset, offset
        ).release().perform()
        time.sleep(0.5)
        taken = driver.find_element("id", "region-box").get_attribute("value") != ""
        assert taken == (offset == 20), offset
    wait_for_answer(driver, answered)


@pytest.mark.browser
@needs_chromium
def test_the_image_fits_its_column_when_the_column_narrows_without_a_window_resize(
    driver, service, tmp_path: Path
) -> None:
    """A column that narrows with no resize event (a scrollbar appearing, a panel opening) still holds the image."""
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(driver, service.url)
    upload(driver, tmp_path / "narrow.png", IMAGE)
    column = "document.getElementById('stage').parentElement"
    assert driver.execute_script(f"return {column}.clientWidth") > 300
    driver.execute_script(f"{column}.style.width = '300px'")
    WebDriverWait(driver, 5).until(lambda d: d.find_element("id", "overlay").size["width"] <= 300)
    assert driver.find_element("id", "image-canvas").size == driver.find_element("id", "overlay").size


# Answers caption requests with the image size given (arguments[0]), as a service that turns the image otherwise.
SERVED_SIZE_JS = r"""
const served = arguments[0];
const realFetch = window.fetch;
window.fetch = async (url, init) => {
  const response = await realFetch(url, init);
  if (!String(url).startsWith("v1/caption") || !response.ok) return response;
  return new Response((await response.text()).replace(/"image":\{[^}]*\}/g, `"image":${JSON.stringify(served)}`), {
    status: 200,
    headers: {"content-type": "text/event-stream"},
  });
};
"""


@pytest.mark.browser
@needs_chromium
def test_an_image_the_service_reads_in_another_frame_is_said(driver, service, tmp_path: Path) -> None:
    """Boxes are drawn over the browser's decode in the service's pixels: sizes that differ (an EXIF rotation
    applied by one only) are said, not drawn wrongly without a word."""
    open_page(driver, service.url)
    driver.execute_script(SERVED_SIZE_JS, {"width": H, "height": W})
    (tmp_path / "turned.png").write_bytes(IMAGE)
    driver.find_element("id", "file").send_keys(str(tmp_path / "turned.png"))
    error = page_error(driver, f"reads this image as {H} x {W} pixels")
    assert f"this browser shows it as {W} x {H}" in error
