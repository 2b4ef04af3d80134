"""Hostile images against the upload path: progressive JPEGs with thousands of repeated scans are
refused before decoding and never delay a normal request, a client that hangs up while queued is never
decoded, the memory decoding takes per image mode stays within the bound the service checks
(measured in a subprocess), images whose mode would exceed it are refused on their header, the
decompression-bomb message says the size, the limit and what to do, and a bounded fuzz test: any
bytes, or a mutated PNG/JPEG, give a prediction or a clean 4xx, never a 500."""

from __future__ import annotations

import io
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import visionpoc.serving.app
from visionpoc.data.images import MAX_PIXELS, load_rgb, peak_bytes_per_pixel
from visionpoc.errors import ImageError
from visionpoc.serving.app import create_app
from visionpoc.serving.predict import Predictor
from visionpoc.serving.uploads import (
    DEFAULT_MAX_DECODED_BYTES,
    MAX_JPEG_SCANS,
    UploadError,
    decode_image,
    jpeg_scans,
    multipart_file,
)


def jpeg(img: Image.Image, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **options)
    return buf.getvalue()


def many_scans(size: int = 2000, repeats: int = 3000) -> bytes:
    """A progressive JPEG of a flat size x size image whose last scan (an AC refinement, a few bytes)
    is repeated `repeats` times: libjpeg re-runs each over every pixel (about 10 s for these defaults)."""
    data = jpeg(Image.new("RGB", (size, size), (120, 90, 60)), progressive=True)
    end = data.rindex(b"\xff\xd9")
    last_scan = data[data.rindex(b"\xff\xda") : end]
    return data[:end] + last_scan * repeats + data[end:]


def png_header(width: int, height: int, depth: int, color_type: int) -> bytes:
    """A tiny PNG whose IHDR declares width x height pixels of `depth` bits and `color_type`."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def form(data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with `data` as the field `file`, and its Content-Type."""
    head = b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n\r\n'
    return head + data + b"\r\n--b0undary--\r\n", "multipart/form-data; boundary=b0undary"


@pytest.fixture(scope="module")
def roomy(run_dir: Path, predictor: Predictor) -> TestClient:
    return TestClient(create_app(run_dir, max_upload_bytes=2 * 2**20, max_pixels=5_000_000, predictor=predictor))


def photo(mini_dogs: Path) -> bytes:
    return sorted((mini_dogs / "Images").rglob("*.jpg"))[0].read_bytes()


# ------------------------------------------------------------------------------------------ JPEG scans


def test_scans_are_counted_on_the_markers() -> None:
    img = Image.effect_noise((64, 48), 40).convert("RGB")
    assert jpeg_scans(jpeg(img)) == 1
    assert jpeg_scans(jpeg(img, progressive=True)) == 10  # libjpeg's default progression for colour
    assert jpeg_scans(jpeg(img.convert("L"), progressive=True)) == 6
    thumb = jpeg(img, progressive=True)  # a progressive JPEG hidden in an APP segment is not counted
    app1 = b"\xff\xe1" + struct.pack(">H", len(thumb) + 2) + thumb
    plain = jpeg(img)
    assert jpeg_scans(plain[:2] + app1 + plain[2:]) == 1
    assert jpeg_scans(many_scans(64, 500), stop=10**6) == 510
    assert jpeg_scans(many_scans(64, 500)) == MAX_JPEG_SCANS + 1  # counting stops past the limit


def test_a_normal_request_behind_four_hostile_jpegs_answers_quickly(roomy: TestClient, mini_dogs: Path) -> None:
    hostile = many_scans()
    assert len(hostile) < 200_000 and jpeg_scans(hostile, stop=10**6) > 3000

    def send(data: bytes) -> tuple[int, str, float]:
        t0 = time.perf_counter()
        r = roomy.post("/predict", files={"file": ("x.jpg", data, "image/jpeg")})
        return r.status_code, r.text, time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=5) as pool:
        attacks = [pool.submit(send, hostile) for _ in range(4)]
        time.sleep(0.2)  # the hostile ones are first in line
        normal = pool.submit(send, photo(mini_dogs)).result()
        refused = [a.result() for a in attacks]
    assert normal[0] == 200, normal[1]
    assert normal[2] < 5  # without the scan limit it waits for four 10 s decodes
    for status, text, seconds in refused:
        assert status == 400 and f"more than {MAX_JPEG_SCANS} scans" in text and "baseline JPEG" in text
        assert seconds < 5


def test_a_progressive_photo_is_still_predicted(roomy: TestClient, mini_dogs: Path) -> None:
    data = jpeg(Image.open(io.BytesIO(photo(mini_dogs))), progressive=True)
    r = roomy.post("/predict", files={"file": ("p.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------------ hang-ups


@pytest.fixture
def live_server(
    run_dir: Path, predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[int, list[int]]]:
    """A real uvicorn server on a free loopback port, one prediction slot, and a decode that takes 1 s
    and records the size of what it decodes."""
    import uvicorn

    decoded: list[int] = []
    real_decode = visionpoc.serving.app.decode_image

    def slow_decode(data: bytes, max_pixels: int) -> Image.Image:
        decoded.append(len(data))
        time.sleep(1.0)
        return real_decode(data, max_pixels)

    monkeypatch.setattr(visionpoc.serving.app, "decode_image", slow_decode)
    app = create_app(run_dir, predictor=predictor, max_concurrent=1)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield sock.getsockname()[1], decoded
    server.should_exit = True
    thread.join(10)


@pytest.mark.slow
def test_an_upload_whose_client_hung_up_is_never_decoded(live_server: tuple[int, list[int]], mini_dogs: Path) -> None:
    import httpx

    port, decoded = live_server
    first, second = photo(mini_dogs), photo(mini_dogs) + b"\0"  # told apart by their size
    with ThreadPoolExecutor(max_workers=1) as pool:
        holder = pool.submit(
            lambda: httpx.post(f"http://127.0.0.1:{port}/predict", files={"file": ("a.jpg", first)}, timeout=30)
        )
        while not decoded:  # the first upload holds the only slot for 1 s
            time.sleep(0.02)
        body, ctype = form(second)
        with socket.create_connection(("127.0.0.1", port)) as s:  # sends the second, then hangs up
            head = f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
            s.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.3)
        assert holder.result().status_code == 200
    time.sleep(1.5)  # the slot is free again: a queued upload would be decoded by now
    assert decoded == [len(first)]


# ------------------------------------------------------------------------------------------ memory

MEASURE = """
import io, sys
from PIL import Image
from visionpoc.data.images import to_rgb
data = open(sys.argv[1], "rb").read()
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
before = status("VmRSS:")
with Image.open(io.BytesIO(data)) as img:
    img.load()
    out = to_rgb(img)
assert out.mode == "RGB"
print(img.mode, status("VmHWM:") - before)
"""


def _in_mode(mode: str, n: int) -> tuple[Image.Image, str]:
    ramp = (np.add.outer(np.arange(n), np.arange(n)) % 4096).astype(np.uint16) * 16  # (n, n), 16-bit
    rgb = Image.fromarray((ramp >> 8).astype(np.uint8)).convert("RGB")
    special = {"I;16": Image.fromarray(ramp), "I": Image.fromarray(ramp.astype(np.int32))}
    special["F"] = Image.fromarray(ramp.astype(np.float32) / 65535)
    img = special[mode] if mode in special else rgb.convert(mode)
    return img, ("TIFF" if mode in ("I", "F", "CMYK") else "PNG")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["L", "RGB", "I;16", "I", "F", "RGBA", "P", "CMYK", "LA"])
def test_decoding_stays_within_the_memory_bound_of_its_mode(tmp_path: Path, mode: str) -> None:
    """The peak resident memory of decoding and converting a 9-megapixel image (VmHWM, which sees
    PIL's C buffers, in a fresh process) stays within `peak_bytes_per_pixel`, plus decoder buffers."""
    n = 3000
    img, fmt = _in_mode(mode, n)
    path = tmp_path / f"image.{fmt.lower()}"
    img.save(path, fmt)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, check=True)
    decoded_mode, peak = out.stdout.split()
    assert decoded_mode == mode
    bound = n * n * peak_bytes_per_pixel(mode)
    assert int(peak) <= bound * 1.1 + 16 * 2**20, f"{mode}: {int(peak) / 2**20:.0f} MB > {bound / 2**20:.0f} MB"


@pytest.mark.parametrize(
    "depth,color_type,mode",
    [(8, 6, "RGBA"), (16, 6, "RGBA"), (8, 4, "LA"), (8, 3, "P")],
    ids=["rgba", "rgba16", "grey-alpha", "palette"],
)
def test_an_image_too_costly_for_its_mode_is_refused_on_its_header(depth: int, color_type: int, mode: str) -> None:
    """At the 64-megapixel cap an RGB photo fits the decoded-bytes bound; these modes do not."""
    data = png_header(7999, 7999, depth, color_type)
    assert 7999 * 7999 * peak_bytes_per_pixel("RGB") <= DEFAULT_MAX_DECODED_BYTES
    t0 = time.perf_counter()
    with pytest.raises(UploadError) as e:
        decode_image(data)
    assert time.perf_counter() - t0 < 1  # decided on the header
    assert e.value.status == 413
    message = e.value.message
    assert f"7999x7999 pixels in PIL mode {mode}" in message and "over the limit of 512.0 MB" in message
    assert "downscale" in message


def test_a_16bit_grey_image_at_the_pixel_cap_fits_the_bound() -> None:
    """7999x7999 16-bit grey (a 124 KB PNG) is within the bound: its header passes, and the truncated
    data is the only complaint."""
    with pytest.raises(UploadError) as e:
        decode_image(png_header(7999, 7999, 16, 0))
    assert e.value.status == 400 and "truncated or corrupt" in e.value.message


def test_the_bomb_message_says_the_size_the_limit_and_what_to_do() -> None:
    with pytest.raises(UploadError) as e:
        decode_image(png_header(20000, 20000, 8, 2))  # over PIL's own limit: refused while opening
    message = e.value.message
    assert e.value.status == 413
    assert message.startswith("image too large: it declares 400,000,000 pixels, over the limit of 64,000,000 pixels")
    assert "downscale to at most 64 megapixels" in message
    assert "Image size" not in message and "DOS attack" not in message  # PIL's own text is not pasted in
    with pytest.raises(UploadError) as e:
        decode_image(png_header(9000, 8000, 8, 2))
    assert "it declares 9000x8000 = 72,000,000 pixels, over the limit of 64,000,000 pixels" in e.value.message


def test_the_dataset_bomb_message_says_the_size_and_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(20000, 20000, 8, 2))
    with pytest.raises(ImageError) as e:
        load_rgb(path)
    message = str(e.value)
    assert f"image {path} declares 400,000,000 pixels, over the {MAX_PIXELS:,} limit" in message
    assert "remove it from the dataset" in message and "Image size" not in message


# ------------------------------------------------------------------------------------------ fuzzing


def _decodes_or_refuses(data: bytes) -> None:
    try:
        img = decode_image(data, max_pixels=1_000_000)
    except UploadError as e:
        assert 400 <= e.status < 500 and e.message
    else:
        assert img.mode == "RGB"


def _seeds() -> list[bytes]:
    img = Image.effect_noise((24, 16), 50).convert("RGB")
    out = []
    for fmt, options in (("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("GIF", {}), ("TIFF", {})):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **options)
        out.append(buf.getvalue())
    return out


SEEDS = _seeds()
FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_any_bytes_decode_or_are_refused(data: bytes) -> None:
    _decodes_or_refuses(data)


@FUZZ
@given(
    st.sampled_from(range(len(SEEDS))),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 10**6),
)
def test_fuzz_mutated_images_decode_or_are_refused(seed: int, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(SEEDS[seed])
    for at, byte in flips:
        data[at % len(data)] = byte
    _decodes_or_refuses(bytes(data[: max(1, len(data) - cut % 64)]))


@FUZZ
@given(st.binary(max_size=512), st.sampled_from(["multipart/form-data; boundary=b0undary", "multipart/form-data"]))
def test_fuzz_the_multipart_parser_answers_or_refuses(tail: bytes, ctype: str) -> None:
    body, _ = form(tail)
    for candidate in (tail, body, body[: len(body) // 2]):
        try:
            multipart_file(candidate, ctype)
        except UploadError as e:
            assert e.status == 400 and e.message


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.one_of(st.binary(max_size=1024), st.sampled_from(SEEDS)))
def test_fuzz_the_service_never_answers_500(roomy: TestClient, data: bytes) -> None:
    r = roomy.post("/predict", files={"file": ("f.bin", data, "application/octet-stream")})
    assert r.status_code in (200, 400, 413), r.text
    assert r.status_code == 200 or r.json()["error"]


def test_the_scan_limit_is_read_from_the_markers_not_guessed() -> None:
    """A baseline JPEG whose compressed data happens to hold many 0xFFDA byte pairs inside an APP
    segment is not mistaken for a many-scan one."""
    plain = jpeg(Image.effect_noise((32, 32), 40).convert("RGB"))
    noise = b"\xff\xda" * 5000
    app = b"\xff\xe2" + struct.pack(">H", len(noise) + 2) + noise
    data = plain[:2] + app + plain[2:]
    assert len(re.findall(b"\xff\xda", data)) > MAX_JPEG_SCANS
    assert decode_image(data).size == (32, 32)
