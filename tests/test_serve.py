"""The web service through FastAPI's TestClient: predictions, refusals (not an image, too large,
decompression bomb), image modes, health, schema, the demo page, and concurrent requests."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import struct
import time
import zlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from test_predict import LABELS
from visionpoc.predict import Predictor
from visionpoc.serve import create_app, is_loopback, serve
from visionpoc.uploads import UploadError, read_limited


@pytest.fixture(scope="module")
def client(run_dir: Path, predictor: Predictor) -> TestClient:
    return TestClient(
        create_app(run_dir, max_upload_bytes=40_000, max_pixels=1000 * 1000, predictor=predictor)
    )


def dog_photos(mini_dogs: Path) -> list[Path]:
    return sorted((mini_dogs / "Images").rglob("*.jpg"))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def post(client: TestClient, data: bytes, name: str = "dog.jpg", query: str = "") -> Any:
    return client.post(f"/predict{query}", files={"file": (name, data, "application/octet-stream")})


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares width x height RGB pixels (its data covers one short row only)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 256))
        + chunk(b"IEND", b"")
    )


def test_predicts_with_every_model(client: TestClient, mini_dogs: Path, predictor: Predictor) -> None:
    path = dog_photos(mini_dogs)[0]
    r = post(client, path.read_bytes(), query="?top=2")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (48, 36)
    assert [a["model"] for a in body["models"]] == LABELS
    expected = predictor.predict_paths([path], top=2)[0]["models"]
    for got, want in zip(body["models"], expected, strict=True):
        assert len(got["top"]) == 2 and got["latency_ms"] > 0 and "explanation" not in got
        assert [t["label"] for t in got["top"]] == [t["label"] for t in want["top"]]
        assert got["top"][0]["probability"] == pytest.approx(want["top"][0]["probability"], abs=1e-6)


def test_explain_returns_png_overlays(client: TestClient, mini_dogs: Path) -> None:
    r = post(client, dog_photos(mini_dogs)[3].read_bytes(), query="?explain=true")
    assert r.status_code == 200, r.text
    methods = {a["model"]: a["explanation"]["method"] for a in r.json()["models"]}
    assert methods == {"cnn": "Grad-CAM", "vit": "attention rollout"}
    for a in r.json()["models"]:
        overlay = Image.open(io.BytesIO(base64.b64decode(a["explanation"]["png_base64"])))
        assert overlay.format == "PNG" and min(overlay.size) >= 224


@pytest.mark.parametrize(
    "data",
    [b"just some text, not a photo", b"", b"\xff\xd8\xff\xe0" + b"\0" * 100],
    ids=["text", "empty", "jpeg-header"],
)
def test_not_an_image_is_400(client: TestClient, data: bytes) -> None:
    r = post(client, data, name="/etc/hostname")  # a server path as the file name reads nothing
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert "image" in r.json()["error"] or "empty" in r.json()["error"]


def test_not_multipart_is_400(client: TestClient, mini_dogs: Path) -> None:
    r = client.post(
        "/predict", content=dog_photos(mini_dogs)[0].read_bytes(), headers={"content-type": "image/jpeg"}
    )
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]
    r = client.post("/predict", files={"photo": ("dog.jpg", b"...", "image/jpeg")})
    assert r.status_code == 400 and "no form field 'file'" in r.json()["error"]


def test_too_large_is_413(client: TestClient) -> None:
    big = encode(Image.effect_noise((200, 200), 64).convert("RGB"), "PNG")  # > 40,000 bytes
    assert len(big) > 40_000
    r = post(client, big)
    assert r.status_code == 413 and "too large" in r.json()["error"]
    r = post(client, big * 3)  # over the body limit too: refused while reading
    assert r.status_code == 413


def test_body_reading_stops_at_the_limit() -> None:
    consumed = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal consumed
        while True:
            consumed += 1
            yield b"x" * 1000

    with pytest.raises(UploadError) as declared:
        asyncio.run(read_limited(endless(), 10_000, "999999999"))
    assert declared.value.status == 413 and consumed == 0  # refused on the header, nothing read
    with pytest.raises(UploadError) as lied:
        asyncio.run(read_limited(endless(), 10_000, "100"))  # Content-Length lies: the bytes count
    assert lied.value.status == 413 and consumed == 11
    with pytest.raises(UploadError, match="invalid Content-Length"):
        asyncio.run(read_limited(endless(), 10_000, "ten"))


@pytest.mark.parametrize("size", [(50_000, 50_000), (1001, 1000)], ids=["50k-squared", "over-our-limit"])
def test_decompression_bomb_is_refused_before_decoding(client: TestClient, size: tuple[int, int]) -> None:
    bomb = png_declaring(*size)
    assert len(bomb) < 200
    t0 = time.perf_counter()
    r = post(client, bomb, name="bomb.png")
    assert time.perf_counter() - t0 < 5  # decoding 2.5 gigapixels would take minutes and 7.5 GB
    assert r.status_code == 413
    assert "pixels" in r.json()["error"] and "decompression bomb" in r.json()["error"]


@pytest.mark.parametrize(
    "mode,fmt", [("L", "PNG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("I;16", "PNG")]
)
def test_image_modes(client: TestClient, mini_dogs: Path, mode: str, fmt: str) -> None:
    img = Image.open(dog_photos(mini_dogs)[0]).convert(mode)
    if mode == "RGBA":
        img.putalpha(128)
    r = post(client, encode(img, fmt), name=f"dog.{fmt.lower()}")
    assert r.status_code == 200, r.text
    assert [a["model"] for a in r.json()["models"]] == LABELS


def test_health_schema_docs_and_page(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok", "models": LABELS, "num_classes": 3}
    schema = client.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200  # the interactive UI itself loads from a CDN
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    assert 'type="file"' in html and "/predict?top=5&explain=true" in html
    assert "http://" not in html and "https://" not in html and "<script src" not in html  # self-contained


def test_concurrent_requests_get_their_own_answers(client: TestClient, mini_dogs: Path) -> None:
    photos = [p.read_bytes() for p in dog_photos(mini_dogs)[::7][:4]]  # one per breed and more

    def answer(data: bytes) -> list[Any]:
        r = post(client, data)
        assert r.status_code == 200, r.text
        return [
            (a["model"], [(t["label"], round(t["probability"], 6)) for t in a["top"]])
            for a in r.json()["models"]
        ]

    single = [answer(d) for d in photos]
    assert len({str(s) for s in single}) > 1  # the images get different answers
    jobs = [i % len(photos) for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda i: answer(photos[i]), jobs))
    assert results == [single[i] for i in jobs]


def test_serve_binds_to_loopback_and_warns_otherwise(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import uvicorn

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    with caplog.at_level(logging.WARNING, logger="visionpoc.serve"):
        serve(run_dir)
        assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8000
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        serve(run_dir, host="0.0.0.0", port=8123)
    assert calls[-1]["host"] == "0.0.0.0"
    assert any("reachable from other machines" in r.getMessage() for r in caplog.records)
