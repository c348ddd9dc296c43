"""Test doubles for the panel comm: a comm that records what the kernel sends and plays the panel,
and the part of a kernel (its comm manager) that ``nbollama.comm.register`` touches."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["FakeComm", "FakeManager", "FakeKernel", "FakeShell", "wait_until"]


class FakeComm:
    """Records ``send`` calls (with the time) and lets a test play the panel."""

    _ids = iter(range(1, 1_000_000))

    def __init__(self) -> None:
        self.comm_id = f"fake-{next(self._ids)}"
        self.sent: list[tuple[float, dict[str, Any]]] = []
        self.closed = False
        self._lock = threading.Lock()
        self._msg_cb: Callable[[dict[str, Any]], object] | None = None
        self._close_cb: Callable[[dict[str, Any]], object] | None = None

    # the comm API nbollama.comm uses
    def send(self, data: Any = None, metadata: Any = None, buffers: Any = None) -> None:
        json.dumps(data)  # what goes over the wire must be JSON
        with self._lock:
            self.sent.append((time.monotonic(), data))

    def on_msg(self, callback: Callable[[dict[str, Any]], object] | None) -> None:
        self._msg_cb = callback

    def on_close(self, callback: Callable[[dict[str, Any]], object] | None) -> None:
        self._close_cb = callback

    def close(self, data: Any = None, metadata: Any = None, buffers: Any = None) -> None:
        self.closed = True

    # playing the panel
    def deliver(self, data: Any) -> None:
        assert self._msg_cb is not None
        self._msg_cb({"content": {"comm_id": self.comm_id, "data": data}})

    def close_from_panel(self) -> None:
        assert self._close_cb is not None
        self._close_cb({"content": {"comm_id": self.comm_id, "data": {}}})

    # reading what was sent
    def messages(self, kind: str | None = None, since: float = 0.0) -> list[dict[str, Any]]:
        with self._lock:
            return [m for t, m in self.sent if t >= since and (kind is None or m["type"] == kind)]

    def times(self, kind: str, since: float = 0.0) -> list[float]:
        with self._lock:
            return [t for t, m in self.sent if t >= since and m["type"] == kind]

    def last(self, kind: str) -> dict[str, Any]:
        found = self.messages(kind)
        assert found, f"no {kind!r} message was sent; sent: {[m['type'] for m in self.messages()]}"
        return found[-1]


class FakeManager:
    """The part of a kernel's comm manager that register/unregister touch."""

    def __init__(self) -> None:
        self.targets: dict[str, Any] = {}

    def register_target(self, name: str, f: Any) -> None:
        self.targets[name] = f

    def unregister_target(self, name: str, f: Any) -> Any:
        return self.targets.pop(name)


class FakeKernel:
    def __init__(self) -> None:
        self.comm_manager = FakeManager()


class FakeShell:
    def __init__(self) -> None:
        self.kernel = FakeKernel()


def wait_until(
    predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.01)
