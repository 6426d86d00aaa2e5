from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Suite, running_suite


@pytest.fixture(scope="module")
def suite() -> Iterator[Suite]:
    """One router + smollm2 worker shared by a module's read-only tests."""
    # Short path: Unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="onebox-") as d:
        with running_suite(Path(d)) as s:
            yield s


@pytest.fixture
def fresh_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="onebox-") as d:
        yield Path(d)
