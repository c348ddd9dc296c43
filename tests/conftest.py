"""Shared fixtures: one real engine on the bundled model for the whole session.

Loading Gemma 3 270M takes a second or two and 250 MB; tests that only need
*an* engine share ``engine`` (parallel 4, ctx 512). Tests that change the
engine's shape load their own, and close it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.displaypub import CapturingDisplayPublisher
from IPython.core.interactiveshell import InteractiveShell

from nbollama import Engine, session
from nbollama.models import default_model_path
from nbollama.remote import RemoteEngine

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def engine(model_path: Path) -> Iterator[Engine]:
    with Engine.load(model_path, parallel=4, ctx=512) as shared:
        yield shared


@pytest.fixture
def engines() -> Iterator[list[RemoteEngine]]:
    """Remote engines a test opens, closed afterwards whatever happens."""
    opened: list[RemoteEngine] = []
    yield opened
    for engine in opened:
        engine.close()


@pytest.fixture
def idle_engine(engine: Engine) -> Engine:
    """The shared engine, after checking no earlier test left requests behind."""
    snap = engine.snapshot()
    assert snap["queue"]["length"] == 0 and snap["busy_slots"] == 0, (
        "a previous test leaked requests"
    )
    return engine


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("NBOLLAMA_CACHE", str(Path.home() / ".cache" / "nbollama"))
    # the result store: a fresh one per test session (kernels the tests start inherit it), so a
    # run never replays what an earlier session kept, and a user's own store is left alone
    os.environ["NBOLLAMA_CACHE_DIR"] = tempfile.mkdtemp(prefix="nbollama-store-")


def noisy_outputs(nb: object) -> list[str]:
    """Every traceback or stderr text in a notebook's outputs, as 'cell N: ...' lines.

    A notebook a user runs must show neither: a background thread's message
    lands in whichever cell is running, so tests look at every cell.
    """
    found: list[str] = []
    for number, cell in enumerate(getattr(nb, "cells", [])):
        for output in cell.get("outputs", []):
            kind = output.get("output_type")
            if kind == "error":
                found.append(f"cell {number}: {output.get('ename')}: {output.get('evalue')}")
            elif kind == "stream" and output.get("name") == "stderr":
                found.append(f"cell {number}: stderr: {output.get('text', '')[:500]}")
    return found


# -- the magics in an in-process IPython shell (test_magics, test_magics_outputs) -------------------


@pytest.fixture(scope="module")
def shell() -> Iterator[InteractiveShell]:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nbollama")
    yield ip
    # keep the shared engine open: detach it before the extension closes "its" engine
    session.set_engine(None, close_previous=False)
    ip.run_line_magic("unload_ext", "nbollama")


@pytest.fixture
def shown(shell: InteractiveShell) -> Iterator[list[dict[str, Any]]]:
    """Every display the magics publish during the test, in order."""
    previous = shell.display_pub
    publisher = CapturingDisplayPublisher()
    shell.display_pub = publisher
    yield publisher.outputs
    shell.display_pub = previous


@pytest.fixture
def kernel_engine(idle_engine: Engine) -> Iterator[Engine]:
    """The shared engine as the kernel's engine, detached (not closed) afterwards."""
    session.set_engine(idle_engine, close_previous=False)
    yield idle_engine
    session.set_engine(None, close_previous=False)
    snap = idle_engine.snapshot()
    assert snap["busy_slots"] == 0 and snap["queue"]["length"] == 0, (
        "the test left requests running"
    )


@pytest.fixture
def no_engine() -> Iterator[None]:
    """No kernel engine; whatever a test loads is closed afterwards (never the shared one)."""
    session.set_engine(None, close_previous=False)
    yield
    session.unload()
