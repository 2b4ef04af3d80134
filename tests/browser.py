"""Headless Chromium for the browser tests: Debian's /usr/bin/chromium driven by Playwright, offline
(no `playwright install`: no browser download)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BUILD = Path(__file__).resolve().parents[1] / "build"  # screenshots kept as CI artifacts

REQUIRE_ENV = "VISIONPOC_REQUIRE_BROWSER"  # CI sets it to 1: a missing browser fails instead of skipping

F = TypeVar("F", bound=Callable[..., Any])


def chromium_test(chromium: Path, required: bool) -> Callable[[F], F]:
    """Decorate a browser test: run it when `chromium` exists; otherwise skip it, or, when `required`, fail
    it with the reason (so that a CI that could not install the browser does not pass silently)."""
    reason = f"{chromium} not found: apt-get install chromium to run this test"

    def decorate(test: F) -> F:
        if chromium.exists():
            return test
        if not required:
            return cast(F, pytest.mark.skip(reason=reason)(test))

        @functools.wraps(test)
        def fail(*args: Any, **kwargs: Any) -> None:
            pytest.fail(f"{reason} ({REQUIRE_ENV}=1: browser tests may not be skipped)")

        return cast(F, fail)

    return decorate


needs_chromium = chromium_test(CHROMIUM, os.environ.get(REQUIRE_ENV) == "1")


@contextmanager
def chromium_page(allowed: tuple[str, ...], width: int = 1200) -> Iterator[tuple[Any, list[str]]]:
    """A page in headless Chromium and the list its console errors, page errors and any request to a
    URL outside `allowed` (prefixes) are appended to."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on(
                "request",
                lambda req: (
                    errors.append(f"request outside {allowed}: {req.url}") if not req.url.startswith(allowed) else None
                ),
            )
            yield page, errors
        finally:
            browser.close()
