"""The web service through FastAPI's TestClient: predictions, refusals (not an image, too large,
decompression bomb, extreme aspect ratio, a server path in the request), uploads kept off the disk,
image modes, health, schema and offline docs, the demo page, concurrent requests (with explanations,
and a bound on how many are decoded at once), models loaded once, and the `serve` command."""

from __future__ import annotations

import asyncio
import base64
import builtins
import io
import logging
import os
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI, UploadFile
from fastapi.testclient import TestClient
from PIL import Image

import visionpoc.serving.app
import visionpoc.serving.predict
from test_predict import LABELS
from visionpoc.cli import main
from visionpoc.serving.app import ErrorResponse, HealthResponse, PredictResponse, create_app, is_loopback, serve
from visionpoc.serving.predict import MAX_ASPECT_RATIO, Predictor
from visionpoc.serving.uploads import UploadError, decode_image, read_limited


@pytest.fixture(scope="module")
def client(run_dir: Path, predictor: Predictor) -> TestClient:
    return TestClient(create_app(run_dir, max_upload_bytes=40_000, max_pixels=1000 * 1000, predictor=predictor))


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
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 256)) + chunk(b"IEND", b"")
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
    r = post(client, data)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert "image" in r.json()["error"] or "empty" in r.json()["error"]


def test_not_multipart_is_400(client: TestClient, mini_dogs: Path) -> None:
    r = client.post("/predict", content=dog_photos(mini_dogs)[0].read_bytes(), headers={"content-type": "image/jpeg"})
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


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("I;16", "PNG")])
def test_image_modes(client: TestClient, mini_dogs: Path, mode: str, fmt: str) -> None:
    img = Image.open(dog_photos(mini_dogs)[0]).convert(mode)
    if mode == "RGBA":
        img.putalpha(128)
    r = post(client, encode(img, fmt), name=f"dog.{fmt.lower()}")
    assert r.status_code == 200, r.text
    assert [a["model"] for a in r.json()["models"]] == LABELS


def test_health_schema_docs_and_page(client: TestClient) -> None:
    health = {"status": "ok", "models": LABELS, "num_classes": 3, "title": "Which dog breed is it?"}
    assert client.get("/health").json() == health
    schema = client.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    assert 'type="file"' in html and "/predict?top=5&explain=true" in html
    assert "http://" not in html and "https://" not in html and "<script src" not in html  # self-contained
    # the run's words, in the page as served (no request needed to show them)
    assert "<h1>Which dog breed is it?</h1>" in html and "Drop a dog photo here" in html
    assert '<div class="muted" id="models">Models: cnn, vit · 3 breeds</div>' in html
    assert schema["info"]["title"] == "visionpoc: Which dog breed is it?"


def resolve(api: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """`node` of the OpenAPI document `api`, or the component schema its `$ref` points to."""
    ref = node.get("$ref")
    if ref is None:
        return node
    assert ref.startswith("#/components/schemas/"), ref
    return api["components"]["schemas"][ref.removeprefix("#/components/schemas/")]


def kind(node: dict[str, Any]) -> str:
    """A property's type in short: "integer", "string[]", "TopClass" (a component), "TopClass[]"."""
    if "$ref" in node:
        return str(node["$ref"]).rsplit("/", 1)[-1]
    return kind(node["items"]) + "[]" if node.get("type") == "array" else str(node["type"])


def field_kinds(schema: dict[str, Any]) -> dict[str, str]:
    return {name: kind(prop) for name, prop in schema["properties"].items()}


def assert_conforms(api: dict[str, Any], node: dict[str, Any], value: Any, where: str = "body") -> None:
    """`value` (parsed JSON) has exactly the shape of the schema `node`: an object's keys are its declared
    properties, in their order, with every required one present, and each value has the declared type."""
    schema = resolve(api, node)
    python_types = {"string": str, "integer": int, "number": (int, float)}
    if schema["type"] == "object":
        assert isinstance(value, dict), where
        assert [k for k in schema["properties"] if k in value] == list(value), f"{where}: keys {list(value)}"
        assert set(schema.get("required", [])) <= set(value), f"{where}: missing {schema['required']}"
        for k, v in value.items():
            assert_conforms(api, schema["properties"][k], v, f"{where}.{k}")
    elif schema["type"] == "array":
        assert isinstance(value, list), where
        for i, item in enumerate(value):
            assert_conforms(api, schema["items"], item, f"{where}[{i}]")
    else:
        assert isinstance(value, python_types[schema["type"]]) and not isinstance(value, bool), f"{where}: {value!r}"
        assert value == schema.get("const", value), where


def test_openapi_documents_the_responses(client: TestClient, mini_dogs: Path) -> None:
    """/openapi.json names every field of the 200 answer of POST /predict and of its refusals, and real
    answers have exactly that shape (explanations included)."""
    api = client.get("/openapi.json").json()

    def body_schema(path: str, method: str, status: str) -> dict[str, Any]:
        return resolve(api, api["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"])

    prediction = body_schema("/predict", "post", "200")
    assert field_kinds(prediction) == {"width": "integer", "height": "integer", "models": "ModelPrediction[]"}
    answer = resolve(api, prediction["properties"]["models"]["items"])
    assert field_kinds(answer) == {
        "model": "string",
        "top": "TopClass[]",
        "latency_ms": "number",
        "explanation": "Explanation",
    }
    assert answer["required"] == ["model", "top", "latency_ms"]  # an explanation only when asked for
    top = resolve(api, answer["properties"]["top"]["items"])
    assert field_kinds(top) == {"label": "string", "index": "integer", "probability": "number"}
    explanation = resolve(api, answer["properties"]["explanation"])
    assert field_kinds(explanation) == {"method": "string", "png_base64": "string"}
    for status in ("400", "413"):
        assert field_kinds(body_schema("/predict", "post", status)) == {"error": "string"}
    health = body_schema("/health", "get", "200")
    assert field_kinds(health) == {
        "status": "string",
        "models": "string[]",
        "num_classes": "integer",
        "title": "string",
    }

    photo = dog_photos(mini_dogs)[0].read_bytes()
    for query, explained in (("?top=3", False), ("?explain=true", True)):
        r = post(client, photo, query=query)
        assert r.status_code == 200, r.text
        real = r.json()
        assert_conforms(api, prediction, real)
        assert PredictResponse.model_validate(real).model_dump(exclude_none=True) == real
        assert list(real) == list(prediction["properties"])
        keys = list(answer["properties"]) if explained else answer["required"]  # every model is explained here
        assert [list(a) for a in real["models"]] == [keys] * len(real["models"])
        assert {tuple(t) for a in real["models"] for t in a["top"]} == {tuple(top["properties"])}
    refused = post(client, b"not an image")
    assert refused.status_code == 400
    assert_conforms(api, body_schema("/predict", "post", "400"), refused.json())
    assert ErrorResponse.model_validate(refused.json()).model_dump() == refused.json()
    alive = client.get("/health").json()
    assert_conforms(api, health, alive)
    assert HealthResponse.model_validate(alive).model_dump() == alive


def test_concurrent_requests_get_their_own_answers(client: TestClient, mini_dogs: Path) -> None:
    photos = [p.read_bytes() for p in dog_photos(mini_dogs)[::7][:4]]  # one per breed and more

    def answer(data: bytes) -> list[Any]:
        r = post(client, data)
        assert r.status_code == 200, r.text
        return [(a["model"], [(t["label"], round(t["probability"], 6)) for t in a["top"]]) for a in r.json()["models"]]

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
    with caplog.at_level(logging.WARNING, logger="visionpoc.serving.app"):
        serve(run_dir)
        assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8000
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        serve(run_dir, host="0.0.0.0", port=8123)
    assert calls[-1]["host"] == "0.0.0.0"
    assert any("reachable from other machines" in r.getMessage() for r in caplog.records)


def test_docs_work_offline(client: TestClient) -> None:
    """With fastapi-offline installed, /docs loads Swagger UI's JS and CSS from this server, not a CDN."""
    pytest.importorskip("fastapi_offline")
    html = client.get("/docs").text
    assert "cdn." not in html and "https://" not in html
    assert '"/docs-assets/swagger-ui-bundle.js"' in html and '"/docs-assets/swagger-ui.css"' in html
    js = client.get("/docs-assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and "SwaggerUIBundle" in js.text
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200
    assert client.get("/docs-assets/redoc.standalone.js").status_code == 404  # only the listed files
    assert client.get("/docs-assets/..%2F__init__.py").status_code == 404


def strip(width: int, height: int, fmt: str = "PNG") -> bytes:
    return encode(Image.new("RGB", (width, height), (120, 90, 60)), fmt)


@pytest.mark.parametrize("size", [(21 * 100, 100), (30, 21 * 30)], ids=["wide", "tall"])
def test_extreme_aspect_ratio_is_400(client: TestClient, size: tuple[int, int]) -> None:
    # 21:1 is just over the limit and still small to resize: without the check it would be predicted
    r = post(client, strip(*size), name="strip.png")
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert f"{size[0]}x{size[1]}" in error and f"more than {MAX_ASPECT_RATIO} times" in error


def test_aspect_ratio_at_the_limit_is_predicted(client: TestClient) -> None:
    r = post(client, strip(MAX_ASPECT_RATIO * 20, 20), name="panorama.png")
    assert r.status_code == 200, r.text
    assert [a["model"] for a in r.json()["models"]] == LABELS


def test_a_100000_by_1_strip_is_refused_on_its_header() -> None:
    """A few hundred bytes of PNG that the eval transform would turn into 25,600,000 x 256 pixels."""
    data = strip(100_000, 1)
    assert len(data) < 1000
    with pytest.raises(UploadError) as refused:
        decode_image(data)
    assert refused.value.status == 400 and "100000x1" in refused.value.message
    declared_only = png_declaring(100_000, 1)  # refused before decoding: its pixel data is short
    with pytest.raises(UploadError, match="100000x1") as on_header:
        decode_image(declared_only)
    assert on_header.value.status == 400


def test_a_server_path_in_the_request_is_never_read(client: TestClient, mini_dogs: Path) -> None:
    """A path to a real photo on the server, given as the file name, a form field or a query parameter,
    with bytes that are not an image: a server that opened the path would answer 200."""
    photo = dog_photos(mini_dogs)[0]
    assert post(client, photo.read_bytes()).status_code == 200  # the photo itself is predicted
    path = str(photo)
    not_image = b"not an image, but see the file name"
    attempts = [
        client.post(
            f"/predict?path={path}&file={path}",
            files={"file": (path, not_image, "image/jpeg")},
            data={"path": path, "filename": path, "url": f"file://{path}"},
        ),
        client.post("/predict", files={"other": ("x.txt", b"x", "text/plain")}, data={"file": path}),
        client.post("/predict", files={"file": (f"file://{path}", not_image, "image/jpeg")}),
    ]
    for r in attempts:
        assert r.status_code == 400, r.text
        assert "not an image" in r.json()["error"]


@contextmanager
def disk_writes() -> Iterator[list[str]]:
    """Record every file opened for writing in this process (os.open, which tempfile uses, and open)."""
    seen: list[str] = []
    real_os_open, real_open = os.open, builtins.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_TMPFILE", 0)

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & write_flags:
            seen.append(str(path))
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax+"):
            seen.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(os, "open", os_open)
    mp.setattr(builtins, "open", open_)
    try:
        yield seen
    finally:
        mp.undo()


def test_uploads_never_touch_disk(
    run_dir: Path, predictor: Predictor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1.2 MB upload, over the 1 MB at which Starlette's UploadFile spools to a temporary file, is
    predicted without writing a file; the same upload to an UploadFile endpoint does write one (the
    check can see it)."""
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    noise = Image.frombytes("RGB", (640, 600), np.random.default_rng(0).bytes(640 * 600 * 3))
    data = encode(noise, "PNG")  # noise does not compress
    assert len(data) > 2**20
    big_client = TestClient(create_app(run_dir, max_upload_bytes=4 * 2**20, predictor=predictor))
    with disk_writes() as written:
        r = post(big_client, data, name="big.png")
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (640, 600)
    assert written == [] and list(spool.iterdir()) == []

    spooling = FastAPI()

    @spooling.post("/upload")
    async def upload(file: UploadFile) -> dict[str, int]:
        return {"size": len(await file.read())}

    with disk_writes() as control:
        assert TestClient(spooling).post("/upload", files={"file": ("big.png", data)}).json()["size"] == len(data)
    assert control, "the check did not see the temporary file of an UploadFile endpoint"


def answers_of(r: Any, with_png: bool = False) -> list[Any]:
    assert r.status_code == 200, r.text
    return [
        (
            a["model"],
            [(t["label"], round(t["probability"], 5)) for t in a["top"]],
            (a["explanation"]["method"], a["explanation"]["png_base64"]) if with_png else None,
        )
        for a in r.json()["models"]
    ]


@pytest.mark.slow
def test_concurrent_explanations_match_sequential_ones(client: TestClient, mini_dogs: Path) -> None:
    """The demo page always asks for explanations: 16 parallel requests, explained and not (the explained
    ones hook the models while plain ones run them), each gets exactly its sequential answer."""
    photos = [p.read_bytes() for p in dog_photos(mini_dogs)[::5][:4]]
    explained = [answers_of(post(client, d, query="?explain=true"), with_png=True) for d in photos]
    plain = [answers_of(post(client, d)) for d in photos]
    assert len({str(e) for e in explained}) == len(photos)  # each image has its own overlays
    jobs = [(i % len(photos), i % 3 != 2) for i in range(16)]  # two thirds explained

    def ask(job: tuple[int, bool]) -> list[Any]:
        i, explain = job
        return answers_of(post(client, photos[i], query="?explain=true" if explain else ""), with_png=explain)

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(ask, jobs))
    assert results == [explained[i] if explain else plain[i] for i, explain in jobs]


def test_uploads_are_decoded_a_few_at_a_time(
    run_dir: Path, predictor: Predictor, mini_dogs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limited = TestClient(create_app(run_dir, predictor=predictor, max_concurrent=2))
    assert visionpoc.serving.app.MAX_CONCURRENT_PREDICTIONS >= 1
    lock, busy, peak = threading.Lock(), [0], [0]
    real_decode = visionpoc.serving.app.decode_image

    def slow_decode(data: bytes, max_pixels: int) -> Image.Image:
        with lock:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
        time.sleep(0.2)  # hold the slot: without the bound, all 8 requests would be decoding together
        try:
            return real_decode(data, max_pixels)
        finally:
            with lock:
                busy[0] -= 1

    monkeypatch.setattr(visionpoc.serving.app, "decode_image", slow_decode)
    data = dog_photos(mini_dogs)[0].read_bytes()
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(lambda _: post(limited, data).status_code, range(8)))
    assert codes == [200] * 8
    assert peak[0] == 2


@pytest.mark.slow
def test_models_load_once(run_dir: Path, mini_dogs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Path] = []
    loaded: list[str] = []
    real_predictor, real_load = visionpoc.serving.app.Predictor, visionpoc.serving.predict.load_trained

    def counting_predictor(run_dir: Path, **kwargs: Any) -> Predictor:
        built.append(run_dir)
        return real_predictor(run_dir, **kwargs)

    def counting_load(run_dir: Path, label: str, *args: Any, **kwargs: Any) -> Any:
        loaded.append(label)
        return real_load(run_dir, label, *args, **kwargs)

    monkeypatch.setattr(visionpoc.serving.app, "Predictor", counting_predictor)
    monkeypatch.setattr(visionpoc.serving.predict, "load_trained", counting_load)
    fresh = TestClient(create_app(run_dir))
    assert built == [run_dir] and loaded == LABELS  # at start-up
    for i, photo in enumerate(dog_photos(mini_dogs)[:6]):
        assert post(fresh, photo.read_bytes(), query="?explain=true" if i % 2 else "").status_code == 200
    assert fresh.get("/health").status_code == 200
    assert built == [run_dir] and loaded == LABELS  # and never again


def test_serve_command(run_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """`visionpoc serve RUN`: loopback by default, --max-upload-mb reaches the app, another host warns."""
    import uvicorn

    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    with caplog.at_level(logging.WARNING, logger="visionpoc.serving.app"):
        assert main(["serve", str(run_dir), "--max-upload-mb", "0.05"]) == 0
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        app, kw = calls[-1]
        assert (kw["host"], kw["port"]) == ("127.0.0.1", 8000)
        limit = int(0.05 * 2**20)
        assert app.state.max_upload_bytes == limit
        noise = encode(Image.effect_noise((300, 300), 64).convert("RGB"), "PNG")
        assert len(noise) > limit
        r = TestClient(app, base_url="http://localhost").post("/predict", files={"file": ("noise.png", noise)})
        assert r.status_code == 413 and f"the limit is {limit:,} bytes" in r.json()["error"]
        assert main(["serve", str(run_dir), "--host", "0.0.0.0", "--port", "8123"]) == 0
    app, kw = calls[-1]
    assert (kw["host"], kw["port"]) == ("0.0.0.0", 8123)
    assert app.state.max_upload_bytes == 10 * 2**20  # the default
    assert any("reachable from other machines" in r.getMessage() for r in caplog.records)


def test_serve_title_flag(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --title` replaces the run's title on the page (escaped: it is text, not markup) and in /health."""
    import uvicorn

    apps: list[FastAPI] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    assert main(["serve", str(run_dir), "--title", "Whose <b>puppy</b> & which?"]) == 0
    client = TestClient(apps[-1], base_url="http://localhost")  # served on loopback: a loopback Host
    html = client.get("/").text
    assert "<h1>Whose &lt;b&gt;puppy&lt;/b&gt; &amp; which?</h1>" in html and "<b>puppy" not in html
    assert "<title>Whose &lt;b&gt;puppy&lt;/b&gt; &amp; which? · visionpoc demo</title>" in html
    assert "Which dog breed" not in html and "· 3 breeds</div>" in html  # the class count stays the run's
    assert client.get("/health").json()["title"] == "Whose <b>puppy</b> & which?"


def test_a_taken_port_is_a_user_error(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(run_dir), "--port", str(port)]) == 2  # uvicorn itself exits with 3
    err = capsys.readouterr().err
    assert f"could not start on 127.0.0.1:{port}" in err and "--port" in err


def test_decoding_leaves_the_warning_filters_alone() -> None:
    """`warnings.catch_warnings()` swaps the process-wide filters under every other thread's feet: the
    decoder refuses a bomb with its own check instead, also above PIL's warning threshold."""
    import warnings

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decode_image changed the global warning filters")

    @contextmanager
    def filters_locked() -> Iterator[None]:
        with pytest.MonkeyPatch.context() as mp:
            for name in ("catch_warnings", "simplefilter", "filterwarnings", "resetwarnings"):
                mp.setattr(warnings, name, forbidden)
            yield

    with filters_locked():
        assert decode_image(strip(40, 30)).size == (40, 30)
    side = int((1.5 * Image.MAX_IMAGE_PIXELS) ** 0.5)  # over PIL's warning threshold, under its error
    over_pil = png_declaring(side, side)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(UploadError) as bomb, filters_locked():
        decode_image(over_pil)
    assert bomb.value.status == 413 and f"{side}x{side}" in bomb.value.message
