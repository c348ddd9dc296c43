"""Snapshots for views: subscriptions served by one monitor thread per engine.

A subscriber runs on the monitor thread, at most once per its interval and
only when something changed. Whatever it raises is logged once per
subscriber and kind of error, to the ``nbollama`` logger, and never printed:
on a background thread, stderr would land in whichever notebook cell happens
to be running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable

from ..exceptions import InvalidParamsError
from .snapshot import EngineSnapshot

__all__ = ["Subscription", "Monitor"]

logger = logging.getLogger("nbollama")


class Subscription:
    """A live subscription to an engine's snapshots; ``close()`` stops the calls."""

    def __init__(
        self, monitor: Monitor, callback: Callable[[EngineSnapshot], object], interval: float
    ) -> None:
        self.callback = callback
        self.interval = interval
        self.last_sent = 0.0
        self.last_key: Hashable = None
        self.closed = False
        self.failures: dict[str, int] = {}  # kind of error -> times it happened
        self._monitor = monitor

    def deliver(self, snapshot: EngineSnapshot) -> None:
        try:
            self.callback(snapshot)
        except Exception as exc:
            kind = type(exc).__name__
            self.failures[kind] = self.failures.get(kind, 0) + 1
            if self.failures[kind] == 1:  # once per subscriber and kind: no flood at 4 Hz
                logger.warning(
                    "nbollama: a snapshot subscriber (%r) failed with %s; it stays subscribed "
                    "and further %s errors from it are counted, not logged",
                    self.callback,
                    kind,
                    kind,
                    exc_info=True,
                )

    def close(self) -> None:
        self.closed = True
        self._monitor.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Monitor:
    """Calls subscribers with fresh snapshots from its own thread, at a bounded rate.

    ``change_key()`` says cheaply whether anything changed since a subscriber's
    last call; only then is a snapshot taken (once, shared by everyone due).
    """

    def __init__(
        self,
        name: str,
        snapshot: Callable[[], EngineSnapshot],
        change_key: Callable[[], Hashable],
        closed: Callable[[], bool],
    ) -> None:
        self._name = name
        self._snapshot = snapshot
        self._change_key = change_key
        self._closed = closed
        self._lock = threading.Lock()
        self._subscriptions: list[Subscription] = []
        self._thread: threading.Thread | None = None
        self._wakeup = threading.Event()
        self._stopping = False

    def subscribe(self, callback: Callable[[EngineSnapshot], object], interval: float) -> Subscription:
        if not isinstance(interval, (int, float)) or interval <= 0:
            raise InvalidParamsError(f"interval={interval!r}: must be > 0 seconds")
        subscription = Subscription(self, callback, float(interval))
        with self._lock:
            self._subscriptions.append(subscription)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"nbollama-monitor-{self._name}", daemon=True)
                self._thread.start()
        self._wakeup.set()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)

    def wake(self) -> None:
        self._wakeup.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after one last snapshot (so views can show "closed")."""
        self._stopping = True
        self._wakeup.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=timeout)

    def _loop(self) -> None:
        try:
            self._serve()
        except Exception:  # a snapshot that cannot be made: log it, never print from this thread
            logger.warning("nbollama: the snapshot monitor stopped", exc_info=True)

    def _serve(self) -> None:
        while not self._stopping and not self._closed():
            with self._lock:
                subs = list(self._subscriptions)
            now = time.monotonic()
            due = [s for s in subs if not s.closed and now - s.last_sent >= s.interval]
            if due:
                key = self._change_key()
                snapshot: EngineSnapshot | None = None
                for sub in due:
                    if sub.last_key == key:
                        continue
                    sub.last_sent, sub.last_key = now, key
                    if snapshot is None:
                        snapshot = self._snapshot()
                    sub.deliver(snapshot)
            self._wakeup.clear()
            if not self._stopping:
                self._wakeup.wait(min((s.interval for s in subs), default=1.0))
        with self._lock:
            subs = list(self._subscriptions)
        if subs:
            final = self._snapshot()
            for sub in subs:
                sub.deliver(final)
