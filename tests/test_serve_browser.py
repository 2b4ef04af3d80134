"""The demo page as a person uses it: uvicorn on a loopback port, headless Chromium (Playwright, offline)
uploads a fixture photo through the file input, or drops one on the page, and waits for both models'
predictions.

Needs Debian's `chromium` at /usr/bin/chromium (skipped without it) and the `playwright` package; no
browser download (`playwright install` is never needed). The screenshot is kept in build/serve.png.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from browser import BUILD, chromium_page, needs_chromium
from test_predict import LABELS
from visionpoc.serving.app import create_app
from visionpoc.serving.predict import Predictor

SCREENSHOT = BUILD / "serve.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(predictor: Predictor) -> Iterator[str]:
    """The service on http://127.0.0.1:PORT, run by uvicorn in a background thread."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        create_app(predictor.run_dir, predictor=predictor), host="127.0.0.1", port=port, log_level="warning"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow
@needs_chromium
def test_demo_page_in_chromium(server: str, predictor: Predictor, mini_dogs: Path) -> None:
    photo = sorted((mini_dogs / "Images").rglob("*.jpg"))[-1]
    expected = {a["model"]: a["top"][0]["label"] for a in predictor.predict_paths([photo])[0]["models"]}
    with chromium_page((server, "data:", "blob:"), width=1100) as (page, errors):
        page.goto(server + "/", wait_until="load")
        page.wait_for_function("document.getElementById('models').textContent.includes('breeds')")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("body[data-state=done]", timeout=30_000)
        cards = {lab: page.inner_text(f".model-card[data-model={lab}]") for lab in LABELS}
        bars = page.locator(".model-card .bar-row").count()
        overlays = page.evaluate(
            "Array.from(document.querySelectorAll('.model-card figure img')).map(i => [i.alt, i.naturalWidth])"
        )
        header = page.inner_text("#models")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert errors == []
    assert header == "Models: cnn, vit · 3 breeds"
    for label, text in cards.items():
        assert text.startswith(label) and " ms" in text
        assert expected[label] in text  # the model's top-1 breed is shown
    assert bars == 2 * 3  # top-5 clipped to the 3 classes, per model
    assert sorted(alt for alt, _ in overlays) == ["Grad-CAM of cnn", "attention rollout of vit"]
    assert all(width >= 224 for _, width in overlays)
    assert SCREENSHOT.stat().st_size > 10_000


# a drop as the browser delivers it: a File in a DataTransfer, carried by dragenter/dragover/drop events
DROP = """([name, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, { type: "image/jpeg" }));
  const zone = document.getElementById("drop");
  const fire = (type) => zone.dispatchEvent(new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: dt }));
  fire("dragenter");
  fire("dragover");
  const highlighted = zone.classList.contains("over");
  const handled = !fire("drop");  // the page's handler called preventDefault: the browser won't open the file
  return { highlighted, handled, after: zone.classList.contains("over") };
}"""


@pytest.mark.slow
@needs_chromium
def test_dropping_a_photo_shows_the_predictions(server: str, predictor: Predictor, mini_dogs: Path) -> None:
    photo = sorted((mini_dogs / "Images").rglob("*.jpg"))[0]
    expected = {a["model"]: a["top"][0]["label"] for a in predictor.predict_paths([photo])[0]["models"]}
    with chromium_page((server, "data:", "blob:"), width=1100) as (page, errors):
        page.goto(server + "/", wait_until="load")
        assert page.get_attribute("body", "data-state") == "idle"
        drop = page.evaluate(DROP, [photo.name, base64.b64encode(photo.read_bytes()).decode("ascii")])
        page.wait_for_selector("body[data-state=done]", timeout=30_000)
        cards = {lab: page.inner_text(f".model-card[data-model={lab}]") for lab in LABELS}
        status = page.inner_text("#status")
        preview = page.evaluate("document.getElementById('preview').naturalWidth")
    assert errors == []
    assert drop == {"highlighted": True, "handled": True, "after": False}
    assert status == f"{photo.name}: 2 models answered."
    assert preview == 48  # the dropped photo is previewed
    for label, text in cards.items():
        assert text.startswith(label) and expected[label] in text


# the visible <img> elements the browser could not decode: each shows a broken-image icon
BROKEN_IMAGES = """Array.from(document.images)
  .filter((i) => i.getClientRects().length > 0 && i.hasAttribute("src") && i.naturalWidth === 0)
  .map((i) => i.id || i.alt)"""


@pytest.mark.slow
@needs_chromium
def test_a_refused_upload_leaves_no_broken_image(server: str, mini_dogs: Path) -> None:
    photo = sorted((mini_dogs / "Images").rglob("*.jpg"))[0]
    fake = {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"these are notes, not a photo"}
    with chromium_page((server, "data:", "blob:"), width=1100) as (page, errors):
        page.goto(server + "/", wait_until="load")
        page.set_input_files("#file", str(photo))  # a photo first: its preview and results must go
        page.wait_for_selector("body[data-state=done]", timeout=30_000)
        shown_before = page.is_visible("#preview")
        page.set_input_files("#file", files=[fake])
        page.wait_for_selector("body[data-state=error]", timeout=30_000)
        page.wait_for_timeout(300)  # let the browser finish (and fail) decoding the fake photo
        broken = page.evaluate(BROKEN_IMAGES)
        preview_visible = page.is_visible("#preview")
        error_visible, error = page.is_visible("#error"), page.inner_text("#error")
        cards = page.locator(".model-card").count()
    assert shown_before
    assert broken == [] and not preview_visible
    assert error_visible and error.startswith("Could not predict: ") and "image" in error
    assert cards == 0
    assert [e for e in errors if "400" not in e] == []  # the refused POST is the only console error


@pytest.mark.slow
def test_real_server_refuses_an_oversized_upload_early(server: str) -> None:
    import httpx

    big = b"\0" * (11 * 2**20)  # over the default 10 MB: refused on Content-Length, before the body is read
    r = httpx.post(server + "/predict", files={"file": ("big.jpg", big, "image/jpeg")}, timeout=30)
    assert r.status_code == 413 and "the limit is 10.0 MB" in r.json()["error"]
    assert httpx.get(server + "/health", timeout=10).json()["models"] == LABELS
