"""The browser tests' guard (tests/browser.py): skip without Chromium locally, fail in CI
(`VISIONPOC_REQUIRE_BROWSER=1`, set by .ci/run) so that a missing browser cannot pass silently."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import pytest

from browser import REQUIRE_ENV, chromium_test


def _a_browser_test() -> Callable[[Path], str]:
    """A fresh test function each time (pytest marks are stored on the function object)."""

    def test(tmp_path: Path) -> str:
        return "ran"

    return test


def test_without_chromium_a_browser_test_is_skipped_locally(tmp_path: Path) -> None:
    guarded = chromium_test(tmp_path / "no-chromium", required=False)(_a_browser_test())
    marks = [(m.name, m.kwargs.get("reason", "")) for m in getattr(guarded, "pytestmark", [])]
    reason = f"{tmp_path / 'no-chromium'} not found: apt-get install chromium to run this test"
    assert marks == [("skip", reason)]


def test_without_chromium_a_browser_test_fails_when_required(tmp_path: Path) -> None:
    guarded = chromium_test(tmp_path / "no-chromium", required=True)(_a_browser_test())
    assert not getattr(guarded, "pytestmark", [])  # not skipped
    assert list(inspect.signature(guarded).parameters) == ["tmp_path"]  # pytest still passes its fixtures
    with pytest.raises(pytest.fail.Exception, match=f"no-chromium not found.*{REQUIRE_ENV}=1"):
        guarded(tmp_path)


def test_with_chromium_the_test_runs_either_way(tmp_path: Path) -> None:
    chromium = tmp_path / "chromium"
    chromium.touch()
    for required in (False, True):
        test = _a_browser_test()
        guarded = chromium_test(chromium, required)(test)
        assert guarded is test and guarded(tmp_path) == "ran"
