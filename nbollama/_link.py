"""The link that follows the kernel's engine, for the dashboard and the side panel alike.

It sits above ``session``: it asks the session for the engine and to be told of
every change, then subscribes to that engine's snapshots.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from . import session
from ._api.monitor import Subscription
from ._api.protocol import EngineLike
from ._api.snapshot import EngineSnapshot

__all__ = ["EngineLink"]


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
        on_engines: Callable[[dict[str, EngineLike]], None] | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self.interval = interval
        self._on_engine = on_engine
        self._on_snapshot = on_snapshot
        self._on_engines = on_engines  # the kernel's engines changed (a view's selector)
        self._selected: str | None = None  # None: the kernel's default engine
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

    @property
    def selected(self) -> str | None:
        """The engine the view is pinned to with ``select`` (None: it follows the kernel's default).

        A pinned view ignores ``%nbollama use``; the pin goes when that engine is
        unloaded, or with ``select(None)`` (the views' "follow the default").
        """
        with self.lock:
            return self._selected

    def follow_session(self) -> None:
        """Track the kernel's engine (``nbollama.session``): attach now, and again after every load."""
        with self.lock:
            if self._closed or self._unfollow is not None:
                return
            unfollow_default = session.on_engine_change(lambda engine: self.attach(self._target()))
            unfollow_set = session.on_engines_change(self._engines_changed)

            def unfollow() -> None:
                unfollow_default()
                unfollow_set()

            self._unfollow = unfollow
        self.attach(self._target())

    def select(self, name: str | None) -> None:
        """Pin the view to the engine called ``name`` while it exists (None: unpin, follow the default)."""
        if name is not None:
            session.engine_named(name)  # a one-line error naming the engines there are
        with self.lock:
            self._selected = name
        self.attach(self._target())

    def _target(self) -> EngineLike | None:
        with self.lock:
            if self._selected is not None:
                chosen = session.engines().get(self._selected)
                if chosen is not None:
                    return chosen
                self._selected = None  # unloaded: back to the default
            return session.current_engine()

    def _engines_changed(self, everyone: dict[str, EngineLike]) -> None:
        self.attach(self._target())
        with self.lock:
            if self._closed or self._on_engines is None:
                return
            self._on_engines(everyone)

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
