"""Headless Chromium for the browser tests: Debian's /usr/bin/chromium driven by Playwright, offline
(no `playwright install`: no browser download)."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
BUILD = Path(__file__).resolve().parents[1] / "build"  # screenshots kept as CI artifacts

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} not found: apt-get install chromium to run this test"
)
