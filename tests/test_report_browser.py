"""The report as a reader sees it: open report.html in headless Chromium (Playwright, offline).

Needs Debian's `chromium` at /usr/bin/chromium (skipped without it, failed when VISIONPOC_REQUIRE_BROWSER=1) and the `playwright` package; no
browser download (`playwright install` is never needed). The screenshot is kept in build/screenshots/report.png
(the picture in docs/images/report.png is a crop of it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from browser import BUILD, chromium_page, needs_chromium
from test_report import make_run

SCREENSHOT = BUILD / "screenshots" / "report.png"


@pytest.mark.slow
@needs_chromium
def test_report_renders_in_chromium(tmp_path: Path) -> None:
    from visionpoc.report import write_report

    run_dir = make_run(tmp_path, n_models=3, images=True, weights=True, failed=True)
    html = write_report(run_dir)
    with chromium_page(("file:", "data:")) as (page, errors):
        page.goto(html.as_uri(), wait_until="load")
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        summary = page.inner_text("#summary")
        labels = page.locator("#summary tbody tr td:first-child b").all_inner_texts()
        test_acc = page.locator("#summary tbody tr td:nth-child(5)").all_inner_texts()
        verdicts = page.locator(".bottom-line .verdict").all_inner_texts()
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert errors == []
    assert len(images) >= 7  # curves, time, 2 scatters, 2 galleries, saliency
    broken = [alt for alt, complete, width in images if not complete or width == 0]
    assert broken == []
    assert labels == ["a", "b", "c", "broken"]  # each row's first cell names its model, in run order
    assert [t.split("\n")[0] for t in test_acc[:2]] == ["85.7%", "75.7%"]  # a's and b's test accuracy
    for text in ("30.0", "1.23 M", "457", "failed: RuntimeError"):
        assert text in summary, text
    assert len(verdicts) == 2 and all("points" in v for v in verdicts)
    assert SCREENSHOT.stat().st_size > 10_000
