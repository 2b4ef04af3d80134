"""`visionpoc demo`: the digits it writes (and reuses), its config, and the whole demo through the CLI: the
loop really learns (real handwritten digits, a CNN and a ViT from scratch), the table, the report's verdict,
the last line, the demo page it serves and a screenshot of its report (build/screenshots/demo_report.png;
docs/images/demo_report.png is a copy)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pytest
from PIL import Image

from browser import BUILD, chromium_page, needs_chromium
from visionpoc.cli import main
from visionpoc.config import load_config
from visionpoc.data.sources import read_dataset
from visionpoc.demo.digits import MARKER, write_digits
from visionpoc.demo.run import config_path
from visionpoc.errors import DataError

SCREENSHOT = BUILD / "screenshots" / "demo_report.png"
DIGITS = [str(d) for d in range(10)]


def test_digits_are_a_folder_dataset_written_once(tmp_path: Path) -> None:
    root = write_digits(tmp_path / "digits")
    ds = read_dataset("folder", root)
    assert ds.class_names == DIGITS
    assert (len(ds.train), len(ds.test)) == (1347, 450)  # all 1,797 scans, 25% held out for test
    per_digit = np.bincount(ds.train.labels) + np.bincount(ds.test.labels)
    assert np.abs(np.bincount(ds.test.labels) - per_digit / 4).max() <= 1  # stratified: each digit's quarter
    with Image.open(ds.test.path(0)) as img:
        assert (img.mode, img.size) == ("RGB", (32, 32))
        pixels = np.asarray(img)  # (32, 32, 3)
    assert (pixels[..., 0] == pixels[..., 2]).all()  # a grey scan as RGB
    assert len(np.unique(pixels)) > 17  # interpolated: more shades than the scans' 17 levels (0..16)
    assert not set(ds.train.files) & set(ds.test.files)  # `<digit>/<scan index>.png`: no scan in both splits
    stamp = (root / MARKER).stat().st_mtime_ns, ds.test.path(0).stat().st_mtime_ns
    assert write_digits(root) == root  # the second demo reuses the images as they are
    assert ((root / MARKER).stat().st_mtime_ns, ds.test.path(0).stat().st_mtime_ns) == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no temporary folder left behind


def test_digits_refuse_a_folder_that_is_not_theirs(tmp_path: Path) -> None:
    mine = tmp_path / "photos"
    (mine / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"photos exists but holds no digits.json.*another --out"):
        write_digits(mine)
    assert [p.name for p in mine.iterdir()] == ["train"]  # left as it was
    root = write_digits(tmp_path / "digits")
    with pytest.raises(DataError, match="at 32 px, not 48"):
        write_digits(root, size=48)


def test_demo_config_is_a_normal_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(config_path())
    assert cfg.data.source == "folder" and cfg.train.augment == "none"
    cnn, vit = cfg.models
    assert (cnn.timm, vit.timm) == ("resnet10t", "vit_tiny_patch16_224")  # a CNN baseline, a ViT candidate
    assert not cnn.pretrained and not vit.pretrained  # nothing to download
    root = write_digits(tmp_path / "digits")
    args = ["compare", "--config", str(config_path()), "--set", f"data.root={root}", "--dry-run"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    plan = capsys.readouterr().out
    assert "1211 train / 136 val / 450 test images, 10 classes" in plan  # 10% of train held out for validation
    assert plan.count("10 epochs x 37 steps = 370 optimizer steps") == 2  # the same budget for both models
    assert not (tmp_path / "run").exists()


@dataclass
class Demo:
    """`visionpoc demo --out OUT --serve --port 0`, run once as a user runs it, still serving its page."""

    out: Path
    printed: list[str]  # its standard output up to the page's URL: the table, the verdict, the last line
    url: str


def _lines(stream: IO[str], into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)


def _wait_for(lines: queue.Queue[str], pattern: str, seconds: float, seen: list[str]) -> re.Match[str]:
    """The first line matching `pattern` within `seconds` (the demo trains first: minutes on a busy CPU);
    every line read is added to `seen`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line.rstrip("\n"))
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"no line matching {pattern!r} in {seconds} s; printed:\n" + "\n".join(seen))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    import httpx

    out = tmp_path_factory.mktemp("demo")
    command = [sys.executable, "-m", "visionpoc", "demo", "--out", str(out), "--serve", "--port", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(out / "stderr.log", "w") as log:  # the log lines and uvicorn's: kept apart from the output
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    printed: list[str] = []
    try:
        url = _wait_for(lines, r"^demo page: (http://127\.0\.0\.1:\d+/)", 900, printed).group(1)
        deadline = time.monotonic() + 60
        while True:  # the URL is printed just before uvicorn binds the port
            try:
                httpx.get(url + "health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, (out / "stderr.log").read_text()
                time.sleep(0.2)
        yield Demo(out, printed[:-1], url)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.slow
def test_demo_runs_a_whole_comparison(demo: Demo) -> None:
    (run_dir,) = demo.out.glob("compare-*")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["dataset"]["class_names"] == DIGITS and results["dataset"]["test_size"] == 450
    cnn, vit = results["models"]
    assert (cnn["label"], vit["label"]) == ("cnn", "vit")
    assert cnn["status"] == "ok" and vit["status"] == "ok", (cnn["error"], vit["error"])
    # real handwritten digits learned from scratch by both families (chance is 10%)
    assert cnn["test_accuracy"] >= 0.90 and vit["test_accuracy"] >= 0.80, (cnn["test_accuracy"], vit["test_accuracy"])
    for m in (cnn, vit):
        assert not [f["code"] for f in m["flags"] if f["code"] == "too_few_steps"]  # a fair budget for both
        history = m["history"]  # the loss went down and validation picked the best epoch
        assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
        assert m["val_accuracy"] == max(h["val_accuracy"] or 0 for h in history)
    # the report's verdict: both models, the difference's interval and McNemar's test
    md = (run_dir / "report.md").read_text()
    bottom = md.split("## Bottom line", 1)[1].split("\n## ", 1)[0]
    assert "cnn" in bottom and "vit" in bottom and "95% CI" in bottom and "McNemar" in bottom
    assert (run_dir / "report.html").is_file()
    # what it printed: the table, the verdict, and a last line with the report and the next commands
    lines = demo.printed
    assert lines[0].split()[:4] == ["model", "train", "time", "(s)"]
    assert [ln.split()[0] for ln in lines[2:4]] == ["cnn", "vit"]
    assert float(lines[2].split()[4]) == pytest.approx(cnn["test_accuracy"], abs=5e-5)
    assert lines[4] == "bottom line:" and "cnn" in lines[5] and "vit" in lines[5] and "McNemar" in lines[5]
    last = lines[-1]
    assert f"report {run_dir / 'report.html'};" in last
    assert f"visionpoc serve {run_dir}" in last and "visionpoc compare" in last


@pytest.mark.slow
def test_demo_serves_its_page(demo: Demo) -> None:
    import httpx

    page = httpx.get(demo.url, timeout=30)
    assert page.status_code == 200 and "<h1>Which digit is it?</h1>" in page.text
    assert httpx.get(demo.url + "health", timeout=30).json()["models"] == ["cnn", "vit"]
    seven = next((demo.out / "digits" / "test" / "7").iterdir())
    answer = httpx.post(demo.url + "predict?top=1", files={"file": ("7.png", seven.read_bytes())}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["models"][0]["top"][0]["label"] == "7"  # the CNN reads a held-out 7


@pytest.mark.slow
@needs_chromium
def test_demo_report_renders_in_chromium(demo: Demo) -> None:
    (run_dir,) = demo.out.glob("compare-*")
    html = run_dir / "report.html"
    with chromium_page(("file:", "data:")) as (page, errors):
        page.goto(html.as_uri(), wait_until="load")
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        verdicts = page.locator(".bottom-line .verdict").all_inner_texts()
        labels = page.locator("#summary tbody tr td:first-child b").all_inner_texts()
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))  # the top of the page, as a reader first sees it
    assert errors == []
    assert images and [alt for alt, complete, width in images if not complete or width == 0] == []
    assert labels == ["cnn", "vit"]
    assert len(verdicts) == 1 and "cnn" in verdicts[0] and "vit" in verdicts[0]
    assert SCREENSHOT.stat().st_size > 10_000
