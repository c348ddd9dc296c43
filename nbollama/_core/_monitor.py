"""Snapshots for views: subscriptions served by one monitor thread per engine, and the link
that follows the kernel's engine for the dashboard and the side panel alike.

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
from typing import TYPE_CHECKING

from ..exceptions import InvalidParamsError
from ._snapshot import EngineSnapshot

if TYPE_CHECKING:
    from ._protocol import EngineLike

__all__ = ["Subscription", "Monitor", "EngineLink"]

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

    def deliver(self, snapshot: EngineSnapshot | None) -> None:
        try:
            self.callback(snapshot)  # type: ignore[arg-type]
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


class EngineLink:
    """Feeds one view from one engine at a time, following the kernel's engine if asked.

    The dashboard and the side panel's comm both use it. ``on_engine(engine
    or None)`` runs on every switch (a view rebuilds there); ``on_snapshot``
    runs for every snapshot, ``None`` meaning the engine closed without a
    final one. Both run with ``lock`` held, never after ``close()``, and a
    late snapshot from an engine the view no longer shows is dropped.
    """

    def __init__(
        self,
        on_engine: Callable[[EngineLike | None], None],
        on_snapshot: Callable[[EngineSnapshot | None], None],
        *,
        interval: float = 0.25,
    ) -> None:
        self.lock = threading.RLock()
        self.interval = interval
        self._on_engine = on_engine
        self._on_snapshot = on_snapshot
        self._engine: EngineLike | None = None
        self._subscription: Subscription | None = None
        self._generation = 0
        self._last_time = 0.0
        self._unfollow: Callable[[], None] | None = None
        self._closed = False

    @property
    def engine(self) -> EngineLike | None:
        return self._engine

    @property
    def following_session(self) -> bool:
        return self._unfollow is not None

    @property
    def live(self) -> bool:
        """True while a subscription can still deliver snapshots."""
        return self._subscription is not None and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    def follow_session(self) -> None:
        """Track the kernel's engine (``nbollama.session``): attach now, and again after every load."""
        from .. import session  # the session module sits above the core

        with self.lock:
            if self._closed or self._unfollow is not None:
                return
            self._unfollow = session.on_engine_change(self.attach)
        self.attach(session.current_engine())

    def attach(self, engine: EngineLike | None) -> None:
        """Show ``engine`` from now on (None: nothing, the view shows its hint)."""
        with self.lock:
            if self._closed:
                return
            if engine is self._engine and self._subscription is not None:
                return
            self._drop_subscription()
            self._generation += 1
            self._engine = engine
            self._last_time = 0.0
            self._on_engine(engine)
            if engine is None:
                return
            if engine.closed:
                self._on_snapshot(None)
                return
            generation = self._generation
            try:
                # Render at once, in this thread, so the view is right when it is displayed.
                self._deliver(generation, engine.snapshot())
                self._subscription = engine.subscribe(
                    lambda snap: self._deliver(generation, snap), interval=self.interval
                )
            except Exception:
                if not engine.closed:
                    raise
            if engine.closed:  # closed before (or while) we subscribed: no final snapshot will come
                self._drop_subscription()
                self._on_snapshot(None)

    def refresh(self) -> None:
        """Deliver a fresh snapshot of the engine shown now (or None without one)."""
        with self.lock:
            if self._closed:
                return
            engine = self._engine
            if engine is None or engine.closed:
                self._on_snapshot(None)
            else:
                self._deliver(self._generation, engine.snapshot())

    def close(self) -> None:
        """Stop the updates and stop following the session; idempotent."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            self._drop_subscription()
            unfollow, self._unfollow = self._unfollow, None
        if unfollow is not None:
            unfollow()

    def _drop_subscription(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            subscription.close()

    def _deliver(self, generation: int, snapshot: EngineSnapshot | None) -> None:
        with self.lock:
            if self._closed or generation != self._generation:
                return  # a late snapshot from an engine this view no longer shows
            if snapshot is not None:
                if snapshot["time"] < self._last_time:
                    return  # older than what is shown (the first render raced the monitor)
                self._last_time = snapshot["time"]
            self._on_snapshot(snapshot)
            if snapshot is None or snapshot["closed"]:
                self._subscription = None
