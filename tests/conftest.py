"""Shared fixtures: one real engine on the bundled model for the whole session.

Loading Gemma 3 270M takes a second or two and 250 MB; tests that only need
*an* engine share ``engine`` (parallel 4, ctx 512). Tests that change the
engine's shape load their own, and close it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbollama import Engine
from nbollama.models import default_model_path

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def engine(model_path: Path) -> Iterator[Engine]:
    with Engine.load(model_path, parallel=4, ctx=512) as shared:
        yield shared


@pytest.fixture
def idle_engine(engine: Engine) -> Engine:
    """The shared engine, after checking no earlier test left requests behind."""
    snap = engine.snapshot()
    assert snap["queue"]["length"] == 0 and snap["busy_slots"] == 0, "a previous test leaked requests"
    return engine


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("NBOLLAMA_CACHE", str(Path.home() / ".cache" / "nbollama"))
