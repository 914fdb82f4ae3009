"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (read-only real data). In CI a missing copy is a failure, elsewhere a skip."""
    if not SHARED_DATA.is_dir() or not (SHARED_DATA / "SOURCES.md").is_file():
        message = f"shared test data not found at {SHARED_DATA} (expected ../shared/data beside the checkout)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: the data is required)")
        pytest.skip(message)
    return SHARED_DATA
