"""`download_stanford_dogs` against a loopback HTTP server (127.0.0.1, ephemeral port): never the network."""

from __future__ import annotations

import re
import shutil
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dogs_fixture import BREEDS, pack_official_tars
from visionpoc.data import download
from visionpoc.data.download import (
    ARCHIVES,
    ENV_URL,
    MARKER,
    OFFICIAL_URL,
    download_stanford_dogs,
    is_extracted,
    resolve_base_url,
)
from visionpoc.data.sources import breed_name, read_stanford_dogs
from visionpoc.errors import DataError


@dataclass
class Server:
    """What the loopback server serves and what it saw."""

    directory: Path
    url: str = ""
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (file name, Range header)
    cut: set[str] = field(default_factory=set)  # names whose next transfer stops after half its bytes
    ignore_range: bool = False

    def names(self) -> list[str]:
        return [n for n, _ in self.requests]


def _handler(state: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep pytest output quiet
            pass

        def do_GET(self) -> None:
            name = self.path.rsplit("/", 1)[-1]
            rng = self.headers.get("Range")
            state.requests.append((name, rng))
            path = state.directory / name
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if m and not state.ignore_range:
                start = int(m.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                start = 0
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))  # the full length, even when cut short
            self.end_headers()
            if name in state.cut:
                state.cut.discard(name)
                body = body[: len(body) // 2]
            self.wfile.write(body)
            self.close_connection = True

    return Handler


@pytest.fixture(scope="module")
def tars(mini_dogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The miniature dataset packed as the three official archives (read-only by convention)."""
    return pack_official_tars(mini_dogs, tmp_path_factory.mktemp("tars"))


@pytest.fixture
def server(tars: Path, tmp_path: Path) -> Iterator[Server]:
    served = tmp_path / "served"
    shutil.copytree(tars, served)
    state = Server(served)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/aditya86/ImageNetDogs"  # no trailing slash
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def assert_valid_tree(root: Path) -> None:
    ds = read_stanford_dogs(root)
    assert len(ds.train) == 3 * 6 and len(ds.test) == 3 * 3  # the mini_dogs fixture's sizes
    assert ds.class_names == [breed_name(f"{w}-{b}") for w, b in BREEDS[:3]]
    assert is_extracted(root) and (root / MARKER).is_file()
    assert (root / "Annotation").is_dir() and (root / "file_list.mat").is_file()
    assert not list(root.glob(".extract-tmp-*"))


def test_resolve_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_URL, raising=False)
    assert resolve_base_url(None) == OFFICIAL_URL
    monkeypatch.setenv(ENV_URL, "http://mirror/")
    assert resolve_base_url(None) == "http://mirror/"
    assert resolve_base_url("http://explicit/") == "http://explicit/"


def test_download_and_extract(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert download_stanford_dogs(root, base_url=server.url, progress=True) == root
    assert_valid_tree(root)
    assert sorted(server.names()) == sorted(ARCHIVES)
    assert all(rng is None for _, rng in server.requests)
    assert all((root / ".downloads" / n).is_file() for n in ARCHIVES)


def test_second_run_is_a_noop(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "root"
    download_stanford_dogs(root, base_url=server.url, progress=False)
    seen = len(server.requests)
    marker_mtime = (root / MARKER).stat().st_mtime_ns
    download_stanford_dogs(root, base_url=server.url, progress=False)
    assert len(server.requests) == seen
    assert (root / MARKER).stat().st_mtime_ns == marker_mtime  # not re-extracted


def test_resume_after_cut_off_transfer(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "CHUNK", 1024)  # the bytes of a chunk cut mid-way are lost: keep it small
    root = tmp_path / "root"
    server.cut.add("images.tar")
    with pytest.raises(DataError, match=r"images\.tar.*re-run .* to resume"):
        download_stanford_dogs(root, base_url=server.url, progress=False)
    part = root / ".downloads" / "images.tar.part"
    full = (server.directory / "images.tar").stat().st_size
    n = part.stat().st_size
    assert full // 2 - 1024 < n <= full // 2  # what arrived, less at most the chunk being read
    assert not is_extracted(root) and not (root / "Images").exists()

    download_stanford_dogs(root, base_url=server.url, progress=False)
    assert ("images.tar", f"bytes={n}-") in server.requests
    assert (root / ".downloads" / "images.tar").stat().st_size == full
    assert not part.exists()
    assert_valid_tree(root)


def test_restart_when_server_ignores_range(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "root"
    part = root / ".downloads" / "images.tar.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage that must not be kept")
    server.ignore_range = True
    download_stanford_dogs(root, base_url=server.url, progress=False)
    assert ("images.tar", "bytes=29-") in server.requests  # asked to resume, got the whole file
    assert_valid_tree(root)


def test_complete_part_file_answered_416(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / ".downloads").mkdir(parents=True)
    shutil.copy(server.directory / "lists.tar", root / ".downloads" / "lists.tar.part")
    download_stanford_dogs(root, base_url=server.url, progress=False)
    size = (server.directory / "lists.tar").stat().st_size
    assert ("lists.tar", f"bytes={size}-") in server.requests
    assert_valid_tree(root)


def test_corrupt_download_is_deleted_and_refetched(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "root"
    good = (server.directory / "annotation.tar").read_bytes()
    (server.directory / "annotation.tar").write_bytes(good[: len(good) // 2])  # served whole, but cut
    with pytest.raises(DataError, match=r"annotation\.tar.*deleted.*re-run"):
        download_stanford_dogs(root, base_url=server.url, progress=False)
    assert not (root / ".downloads" / "annotation.tar").exists()
    assert not is_extracted(root) and not (root / "Images").exists()
    (server.directory / "annotation.tar").write_bytes(good)
    download_stanford_dogs(root, base_url=server.url, progress=False)
    assert server.names().count("annotation.tar") == 2 and server.names().count("images.tar") == 1
    assert_valid_tree(root)


def test_http_error_names_url(server: Server, tmp_path: Path) -> None:
    (server.directory / "lists.tar").unlink()
    with pytest.raises(DataError, match=r"lists\.tar: HTTP 404"):
        download_stanford_dogs(tmp_path / "root", base_url=server.url, progress=False)


def test_env_var_override(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_URL, server.url + "/")
    root = tmp_path / "root"
    download_stanford_dogs(root, base_url=None, progress=False)
    assert sorted(server.names()) == sorted(ARCHIVES)
    assert_valid_tree(root)


def _copy_tars(tars: Path, dest: Path) -> Path:
    shutil.copytree(tars, dest)
    return dest


def test_from_dir_without_server(tars: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_URL, "http://127.0.0.1:9/unreachable/")  # any download attempt would fail
    src = _copy_tars(tars, tmp_path / "mine")
    root = tmp_path / "root"
    download_stanford_dogs(root, from_dir=src, progress=False)
    assert_valid_tree(root)
    assert not (root / ".downloads").exists()
    assert sorted(p.name for p in src.iterdir()) == sorted(ARCHIVES)  # the user's archives untouched


def test_cli_download_from_dir_then_check(
    tars: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`visionpoc data download --from DIR --root R`, then `data check --json`: the commands, end to end."""
    import json

    from visionpoc.cli import main

    monkeypatch.setenv(ENV_URL, "http://127.0.0.1:9/unreachable/")  # any download attempt would fail
    root = tmp_path / "root"
    assert main(["data", "download", "--root", str(root), "--from", str(_copy_tars(tars, tmp_path / "mine"))]) == 0
    assert_valid_tree(root)
    capsys.readouterr()
    assert main(["data", "check", "--root", str(root), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    ds = read_stanford_dogs(root)
    assert (found["train"], found["test"], found["classes"]) == (len(ds.train), len(ds.test), ds.num_classes)
    assert found["train"] > 0 and found["test"] > 0 and found["classes"] > 1
    assert main(["data", "download", "--root", str(root), "--from", str(tmp_path / "nowhere")]) == 0  # no-op


@pytest.mark.parametrize("cut", ["half", "member_boundary"])
def test_truncated_archive_rejected(tars: Path, tmp_path: Path, cut: str) -> None:
    src = _copy_tars(tars, tmp_path / "mine")
    images = src / "images.tar"
    data = images.read_bytes()
    if cut == "half":
        images.write_bytes(data[: len(data) // 2])
    else:  # a cut exactly after a member's data: tarfile alone reads this without complaint
        with tarfile.open(images) as t:
            members = t.getmembers()
        m = members[len(members) // 2]
        end = m.offset_data + -(-m.size // 512) * 512
        images.write_bytes(data[:end])
    root = tmp_path / "root"
    with pytest.raises(DataError, match=r"images\.tar.*truncated or corrupt"):
        download_stanford_dogs(root, from_dir=src, progress=False)
    assert not is_extracted(root)
    assert not (root / "Images").exists()
    assert images.exists()  # never delete the user's own file
    assert not list(root.glob(".extract-tmp-*"))


def test_unsafe_member_rejected(tars: Path, tmp_path: Path) -> None:
    src = _copy_tars(tars, tmp_path / "mine")
    evil = tmp_path / "evil.txt"
    evil.write_text("x")
    with tarfile.open(src / "annotation.tar", "a") as t:
        t.add(evil, arcname="../evil.txt")
    root = tmp_path / "root"
    with pytest.raises(DataError, match=r"annotation\.tar.*unsafe"):
        download_stanford_dogs(root, from_dir=src, progress=False)
    assert not (root / "evil.txt").exists() and not is_extracted(root)


def test_invalid_tree_is_not_moved_into_root(tars: Path, tmp_path: Path) -> None:
    src = _copy_tars(tars, tmp_path / "mine")
    lists = src / "lists.tar"
    with tarfile.open(tars / "lists.tar") as t_in, tarfile.open(lists, "w") as t_out:
        for m in t_in.getmembers():
            if m.name != "test_list.mat":
                t_out.addfile(m, t_in.extractfile(m))
    root = tmp_path / "root"
    with pytest.raises(DataError, match=r"not a valid Stanford Dogs tree.*test_list\.mat"):
        download_stanford_dogs(root, from_dir=src, progress=False)
    assert not is_extracted(root)
    assert sorted(p.name for p in root.iterdir()) == []  # nothing moved, temp dir cleaned up


def test_missing_archive_in_from_dir(tars: Path, tmp_path: Path) -> None:
    src = _copy_tars(tars, tmp_path / "mine")
    (src / "annotation.tar").unlink()
    with pytest.raises(DataError, match=r"annotation\.tar not found in .*mine"):
        download_stanford_dogs(tmp_path / "root", from_dir=src, progress=False)


def test_interrupted_move_is_redone(tars: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    download_stanford_dogs(root, from_dir=tars, progress=False)
    (root / MARKER).unlink()  # as if the run died after moving some folders, before the marker
    (root / "test_list.mat").unlink()
    shutil.rmtree(root / "Images" / f"{BREEDS[0][0]}-{BREEDS[0][1]}")
    assert not is_extracted(root)
    download_stanford_dogs(root, from_dir=tars, progress=False)
    assert_valid_tree(root)
