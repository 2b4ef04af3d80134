"""Load check of the web service: start `visionpoc.serving.app.serve` in a subprocess on a loopback port, send
N prediction requests from a thread pool (keep-alive connections), and report requests/s and client
latency percentiles. Not a test: run it by hand and paste (or `--append`) the section it prints.

    python scripts/load_check.py                      # builds a tiny run in a temp folder first
    python scripts/load_check.py --run runs/poc --requests 300 --concurrency 8 --image dog.jpg
    python scripts/load_check.py --append docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import httpx
import numpy as np

from visionpoc.results import cpu_name

TESTS = Path(__file__).resolve().parents[1] / "tests"
TINY = """\
data: {{source: stanford_dogs, root: '{root}', val_fraction: 0.2, num_workers: 0, download: false}}
models:
  - {{label: cnn, timm: test_resnet, pretrained: false, finetune: top_fraction, fraction: 0.5, img_size: 48}}
  - {{label: vit, timm: vit_tiny_patch16_224, pretrained: false, img_size: 32, model_kwargs: {{depth: 2}}}}
train: {{epochs: 1, batch_size: 8, lr: 0.001, warmup_epochs: 0.5}}
"""


def build_tiny_run(folder: Path) -> tuple[Path, Path]:
    """A tiny trained run over the test fixture's miniature Stanford Dogs; returns (run, one photo)."""
    sys.path.insert(0, str(TESTS))
    from dogs_fixture import make_mini_dogs
    from visionpoc.compare import run_compare
    from visionpoc.config import load_config

    dogs = make_mini_dogs(folder / "dogs")
    (folder / "tiny.yaml").write_text(TINY.format(root=dogs))
    run_compare(load_config(folder / "tiny.yaml"), folder / "run")
    return folder / "run", next((dogs / "Images").rglob("*.jpg"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(run: Path, port: int) -> subprocess.Popen[bytes]:
    code = f"from visionpoc.serving.app import serve; serve({str(run)!r}, host='127.0.0.1', port={port})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not answer /health within 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a finished run (default: build a tiny one in a temp folder)")
    ap.add_argument("--image", type=Path, help="the photo to send (default: a fixture photo, enlarged)")
    ap.add_argument("--size", type=int, default=500, help="width of the default photo, px (default 500)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--append", type=Path, help="append the markdown section to this file")
    args = ap.parse_args()

    if args.run and not args.image:
        ap.error("--run needs --image (a photo to send)")
    from PIL import Image

    from visionpoc.results import load_results

    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            run, photo = args.run, args.image
        else:
            run, fixture = build_tiny_run(Path(tmp))
            img = Image.open(args.image or fixture).convert("RGB")
            img = img.resize((args.size, round(args.size * img.height / img.width)), Image.Resampling.BICUBIC)
            photo = Path(tmp) / "photo.jpg"
            img.save(photo, quality=90)
        data = Path(photo).read_bytes()
        w, h = Image.open(photo).size
        labels = [f"{m.label} ({m.timm})" for m in load_results(run).models if m.status == "ok"]
        port = free_port()
        server = start_server(run, port)
        url = f"http://127.0.0.1:{port}/predict"
        clients = [httpx.Client(timeout=60) for _ in range(args.concurrency)]

        def one(i: int) -> tuple[float, float]:
            t0 = time.perf_counter()
            r = clients[i % args.concurrency].post(url, files={"file": ("dog.jpg", data, "image/jpeg")})
            ms = (time.perf_counter() - t0) * 1000
            r.raise_for_status()
            return ms, sum(a["latency_ms"] for a in r.json()["models"])

        try:
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(one, range(2 * args.concurrency)))  # warm-up: connections, allocator, caches
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                results = list(pool.map(one, range(args.requests)))
                wall = time.perf_counter() - t0
        finally:
            server.terminate()
            server.wait(timeout=30)
            for c in clients:
                c.close()
    ms = np.array([r[0] for r in results])
    model_ms = np.array([r[1] for r in results])
    section = f"""
## Service load check (CPU, tiny models)

`python scripts/load_check.py` on {dt.date.today().isoformat()}: the service (`visionpoc.serving.app`, uvicorn, one
process) on 127.0.0.1, {args.requests} `POST /predict` requests (one {w}x{h} JPEG of {len(data) / 1024:.0f} KiB,
top-5, no explanation) from {args.concurrency} client threads with keep-alive connections, after
{2 * args.concurrency} warm-up requests. Every request runs all models: {", ".join(labels)}.

| requests/s | p50 latency (ms) | p95 latency (ms) | max (ms) | model forward, sum over models, p50 (ms) |
|---:|---:|---:|---:|---:|
| {args.requests / wall:.1f} | {np.percentile(ms, 50):.1f} | {np.percentile(ms, 95):.1f} | {ms.max():.1f} | {np.percentile(model_ms, 50):.2f} |

Client latency is upload + multipart parsing + decode + preprocessing + every model's forward + JSON,
as a client on the same machine sees it (client and server share the CPU); the forward column is the
server's own clock around each model's forward pass, slowed by the concurrent requests sharing the cores. Machine: {cpu_name()},
{os.cpu_count()} logical CPUs, no GPU, 1-minute load average {load:.1f} when the timed requests began
(other work was running on this shared machine, so take the figures as an order of magnitude).
Python {platform.python_version()}, torch {version("torch")}, timm {version("timm")},
fastapi {version("fastapi")}, uvicorn {version("uvicorn")}. The tiny models say nothing about a real
model's speed: rerun with `--run` on a real run for that.
"""
    print(section)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            f.write(section)


if __name__ == "__main__":
    main()
