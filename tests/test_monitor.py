"""The snapshot monitor and the nbollama logger: bounded rate, failures logged once and never printed."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from nbollama._api.monitor import Monitor
from nbollama._logging import BACKGROUND_THREAD_PREFIX, logger


class Changing:
    """Snapshots that change every time they are asked for (as a busy engine's do)."""

    def __init__(self) -> None:
        self.n = 0
        self.closed = False

    def snapshot(self) -> Any:
        self.n += 1
        return {"seq": self.n, "closed": self.closed, "time": time.time()}

    def key(self) -> int:
        return time.monotonic_ns()


def test_a_subscriber_is_called_at_most_once_per_interval() -> None:
    source = Changing()
    monitor = Monitor("t1", source.snapshot, source.key, lambda: source.closed)
    calls: list[float] = []
    sub = monitor.subscribe(lambda snap: calls.append(time.monotonic()), 0.1)
    time.sleep(1.05)
    sub.close()
    monitor.stop()
    assert 6 <= len(calls) <= 12, calls
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert min(gaps) >= 0.09


def test_nothing_is_sent_while_nothing_changes() -> None:
    source = Changing()
    monitor = Monitor("t2", source.snapshot, lambda: "same", lambda: source.closed)
    calls: list[Any] = []
    monitor.subscribe(calls.append, 0.02)
    time.sleep(0.3)
    monitor.stop()
    assert len(calls) == 2  # the first one, and the final one at stop


def test_a_failing_subscriber_is_logged_once_per_kind_and_never_printed(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    source = Changing()
    monitor = Monitor("t3", source.snapshot, source.key, lambda: source.closed)
    good: list[Any] = []
    turns = {"n": 0}

    def bad(snapshot: Any) -> None:
        turns["n"] += 1
        raise (KeyError if turns["n"] % 2 else ValueError)("boom")

    caplog.set_level(logging.WARNING, logger="nbollama")
    failing = monitor.subscribe(bad, 0.02)
    monitor.subscribe(good.append, 0.02)
    time.sleep(0.5)
    monitor.stop()
    assert turns["n"] >= 10 and len(good) >= 10  # the other subscriber kept its updates
    assert set(failing.failures) == {"KeyError", "ValueError"}
    records = [r for r in caplog.records if "snapshot subscriber" in r.getMessage()]
    assert len(records) == 2  # once per kind, not once per call
    assert all(r.threadName.startswith(BACKGROUND_THREAD_PREFIX) for r in records)
    out, err = capfd.readouterr()
    assert "boom" not in err and "Traceback" not in err and "subscriber" not in err


def test_the_logger_prints_warnings_from_the_callers_thread_only(capfd: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()  # as in a kernel: the application configured no logging
    try:
        logger.warning("said on the caller's thread")
        worker = threading.Thread(target=lambda: logger.warning("said on a worker"), name=f"{BACKGROUND_THREAD_PREFIX}test")
        worker.start()
        worker.join()
        logger.info("an info line")
    finally:
        root.handlers[:] = saved
    err = capfd.readouterr().err
    assert "said on the caller's thread" in err
    assert "said on a worker" not in err and "an info line" not in err


def test_a_final_snapshot_reaches_subscribers_when_the_source_closes() -> None:
    source = Changing()
    monitor = Monitor("t4", source.snapshot, source.key, lambda: source.closed)
    seen: list[Any] = []
    monitor.subscribe(seen.append, 0.05)
    time.sleep(0.12)
    source.closed = True
    monitor.stop()
    assert seen and seen[-1]["closed"] is True
