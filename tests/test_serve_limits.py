"""The service under load and against hostile clients: /health and the page answer while every thread
is busy predicting, a full queue answers 503 with Retry-After, a slow or abandoned upload is cut off and
logged as one line, a client trickling its headers is disconnected, and only loopback Host names are
served when bound to loopback (`--allowed-host` widens it). The timeout tests run a real uvicorn server
on a free 127.0.0.1 port, with the settings `serve` uses; every wait is bounded, every server stopped."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

import visionpoc.serving.app
from visionpoc.cli import main
from visionpoc.serving.app import create_app
from visionpoc.serving.limits import (
    MAX_CONNECTIONS,
    MAX_QUEUED_PREDICTIONS,
    HeaderDeadlineH11,
    server_settings,
    trusted_hosts,
)
from visionpoc.serving.predict import Predictor

ANYIO_THREADS = 40  # anyio's default thread-pool size, which sync endpoints share with predictions
BOUNDARY = "visionpoc-test-boundary"


def photo(mini_dogs: Path) -> bytes:
    return sorted((mini_dogs / "Images").rglob("*.jpg"))[0].read_bytes()


def upload_request(data: bytes, host: str = "127.0.0.1") -> bytes:
    """A whole POST /predict request, as raw bytes."""
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="dog.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (at most `timeout` seconds per read)."""
    sock.settimeout(timeout)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def wait_until(condition: Any, timeout: float = 20, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextmanager
def running(app: FastAPI, **overrides: Any) -> Iterator[int]:
    """`app` served by uvicorn with `serve`'s settings (and `overrides`) on a free 127.0.0.1 port, in a
    thread; yields the port and stops the server on exit."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, **{**server_settings(), "log_level": "warning", **overrides})
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), what="uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


@contextmanager
def blocked_decoding(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[int], threading.Event]]:
    """Every decode waits for the event (set on exit, whatever happens); yields (a one-item count of
    the decodes started, the event)."""
    entered, release, lock = [0], threading.Event(), threading.Lock()
    real_decode = visionpoc.serving.app.decode_image

    def waiting_decode(data: bytes, max_pixels: int) -> Image.Image:
        with lock:
            entered[0] += 1
        assert release.wait(30), "the test never released the decode"
        return real_decode(data, max_pixels)

    monkeypatch.setattr(visionpoc.serving.app, "decode_image", waiting_decode)
    try:
        yield entered, release
    finally:
        release.set()


def test_health_and_page_answer_while_every_thread_predicts(
    run_dir: Path, predictor: Predictor, mini_dogs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploads held in decoding fill the whole thread pool; /health and / still answer at once."""
    app = create_app(run_dir, predictor=predictor, max_concurrent=64, max_queue=64)
    request = upload_request(photo(mini_dogs))
    with blocked_decoding(monkeypatch) as (entered, release), running(app) as port:
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(ANYIO_THREADS + 5)]
        try:
            for c in clients:
                c.sendall(request)
            wait_until(lambda: entered[0] >= ANYIO_THREADS, what="the thread pool to fill")
            start = time.monotonic()
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
            assert health.status_code == 200 and page.status_code == 200
            assert time.monotonic() - start < 2
            assert entered[0] == ANYIO_THREADS  # the predictions were still held while they answered
            release.set()
            answers = [read_all(c) for c in clients]
        finally:
            for c in clients:
                c.close()
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers), [a[:40] for a in answers]


def test_a_full_queue_answers_503_with_retry_after(
    run_dir: Path, predictor: Predictor, mini_dogs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(run_dir, predictor=predictor, max_concurrent=1, max_queue=1)
    client = TestClient(app)
    files = {"file": ("dog.jpg", photo(mini_dogs))}
    with blocked_decoding(monkeypatch) as (entered, release), ThreadPoolExecutor(max_workers=3) as pool:
        first = pool.submit(client.post, "/predict", files=files)
        wait_until(lambda: entered[0] == 1, what="the first upload to be decoding")
        second = pool.submit(client.post, "/predict", files=files)
        wait_until(lambda: app.state.admission.count == 2, what="the second upload to wait")
        third = pool.submit(client.post, "/predict", files=files).result(timeout=10)  # refused, not queued
        assert third.status_code == 503, third.text
        assert third.headers["retry-after"] == "2" and "busy" in third.json()["error"]
        assert client.get("/health").status_code == 200
        release.set()
        assert first.result(timeout=30).status_code == 200 and second.result(timeout=30).status_code == 200
    assert app.state.admission.count == 0  # every slot given back
    assert client.post("/predict", files=files).status_code == 200


def slow_upload_head(length: int) -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {length}\r\n\r\n--{BOUNDARY}\r\n"
    ).encode()


def aborted_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "aborted" in r.getMessage()]


def test_a_slow_body_is_cut_off_and_logged_as_one_line(
    run_dir: Path, predictor: Predictor, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(run_dir, predictor=predictor, body_timeout_s=0.5)
    with caplog.at_level(logging.INFO), running(app) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(slow_upload_head(5000))  # then nothing: the body never arrives
            start = time.monotonic()
            answer = read_all(slow, timeout=5)
            assert time.monotonic() - start < 3  # answered, and the connection closed
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"did not arrive within 0.5 s" in answer
        with socket.create_connection(("127.0.0.1", port), timeout=10) as gone:
            gone.sendall(slow_upload_head(5000))
            time.sleep(0.1)
        wait_until(lambda: len(aborted_lines(caplog)) == 2, timeout=10, what="the disconnect to be logged")
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200  # still serving
    lines = aborted_lines(caplog)
    assert "did not arrive within 0.5 s" in lines[0].getMessage() and "disconnected" in lines[1].getMessage()
    assert all(r.name == "visionpoc.serving.app" and r.exc_info is None for r in lines)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]  # no traceback


def test_trickled_headers_are_cut_off_and_large_ones_refused(run_dir: Path, predictor: Predictor) -> None:
    quick = type("QuickHeaderDeadline", (HeaderDeadlineH11,), {"header_timeout_s": 0.5})
    with running(create_app(run_dir, predictor=predictor), http=quick) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as loris:
            loris.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never the final blank line
            start = time.monotonic()
            assert read_all(loris, timeout=5) == b""  # closed, without an answer
            assert time.monotonic() - start < 3
        with socket.create_connection(("127.0.0.1", port), timeout=10) as huge:
            huge.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 40_000)  # and counting
            assert read_all(huge, timeout=5).startswith(b"HTTP/1.1 400")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:  # keep-alive still works
            assert [client.get("/health").status_code for _ in range(3)] == [200, 200, 200]


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.1.nip.io"])
def test_a_foreign_host_is_refused_on_loopback(run_dir: Path, predictor: Predictor, host: str) -> None:
    client = TestClient(create_app(run_dir, predictor=predictor, allowed_hosts=trusted_hosts("127.0.0.1")))
    assert client.get("/health", headers={"Host": host}).status_code == 400
    assert client.get("/", headers={"Host": host}).status_code == 400
    for ok in ("localhost", "localhost:8000", "127.0.0.1:1234", "[::1]:8000", "LOCALHOST"):
        assert client.get("/health", headers={"Host": ok}).status_code == 200, ok


def test_trusted_hosts() -> None:
    assert trusted_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "[::1]"]
    assert trusted_hosts("::1") == ["localhost", "127.0.0.1", "[::1]"]
    assert trusted_hosts("127.0.0.2", ["Dogs.lan"]) == ["localhost", "127.0.0.1", "[::1]", "127.0.0.2", "dogs.lan"]
    assert trusted_hosts("0.0.0.0") is None  # reachable from elsewhere by choice: any name
    assert trusted_hosts("0.0.0.0", ["dogs.lan"]) == ["localhost", "127.0.0.1", "[::1]", "dogs.lan"]


def test_serve_flags_widen_the_hosts_and_set_the_limits(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    calls: list[tuple[FastAPI, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    assert main(["serve", str(run_dir)]) == 0
    app, kw = calls[-1]
    assert kw["limit_concurrency"] == MAX_CONNECTIONS and kw["http"] is HeaderDeadlineH11
    assert kw["timeout_keep_alive"] > 0 and kw["h11_max_incomplete_event_size"] > 0
    assert app.state.admission.limit == visionpoc.serving.app.MAX_CONCURRENT_PREDICTIONS + MAX_QUEUED_PREDICTIONS
    client = TestClient(app)
    assert client.get("/health", headers={"Host": "attacker.example"}).status_code == 400
    assert client.get("/health", headers={"Host": "dogs.lan:8000"}).status_code == 400
    assert client.get("/health", headers={"Host": "localhost:8000"}).status_code == 200

    assert (
        main(["serve", str(run_dir), "--allowed-host", "dogs.lan", "--allowed-host", "x.lan", "--max-queue", "3"]) == 0
    )
    app, _ = calls[-1]
    assert app.state.admission.limit == visionpoc.serving.app.MAX_CONCURRENT_PREDICTIONS + 3
    client = TestClient(app)
    assert client.get("/health", headers={"Host": "dogs.lan:8000"}).status_code == 200
    assert client.get("/health", headers={"Host": "x.lan"}).status_code == 200
    assert client.get("/health", headers={"Host": "attacker.example"}).status_code == 400
