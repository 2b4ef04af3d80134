from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dogs_fixture import make_mini_dogs  # noqa: E402


@pytest.fixture(scope="session")
def mini_dogs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention miniature Stanford Dogs (3 breeds, 6 train + 3 test each)."""
    return make_mini_dogs(tmp_path_factory.mktemp("dogs"))


@pytest.fixture
def fresh_dogs(tmp_path: Path) -> Path:
    """A miniature Stanford Dogs that a test may damage."""
    return make_mini_dogs(tmp_path / "dogs")
