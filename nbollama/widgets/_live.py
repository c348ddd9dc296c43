"""The wire between an engine and a view: one subscription, one lock, the session followed.

Snapshots arrive on the engine's monitor thread. ipywidgets sends a trait
change through the kernel's IOPub thread from whichever thread makes it, so
views update in place from there; the lock only keeps one view's updates from
interleaving (a snapshot on the monitor thread against an engine swap or a
``close()`` on the kernel's thread).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import ipywidgets as widgets

from .._core._engine import Engine, Subscription
from .._core._snapshot import EngineSnapshot
from ..session import current_engine, on_engine_change

__all__ = [
    "LiveView",
    "LiveLink",
    "DEFAULT_INTERVAL",
    "close_tree",
    "close_children",
]

#: Seconds between view updates at most (4 Hz): enough to watch tokens flow,
#: cheap enough that the engine does not notice.
DEFAULT_INTERVAL = 0.25


class LiveLink:
    """Feeds ``on_snapshot`` from one engine at a time; ``close()`` stops it for good.

    ``on_engine(engine_or_None)`` runs on every switch (a view rebuilds its
    rows or resets its history there); ``on_snapshot(snapshot_or_None)``
    runs for every snapshot, ``None`` meaning the engine closed without a
    final one. Both run with ``lock`` held, never after ``close()``.
    """

    def __init__(
        self,
        on_engine: Callable[[Engine | None], None],
        on_snapshot: Callable[[EngineSnapshot | None], None],
        *,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.lock = threading.RLock()
        self.interval = interval
        self._on_engine = on_engine
        self._on_snapshot = on_snapshot
        self._engine: Engine | None = None
        self._subscription: Subscription | None = None
        self._generation = 0
        self._last_time = 0.0
        self._unfollow: Callable[[], None] | None = None
        self._closed = False

    @property
    def engine(self) -> Engine | None:
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
        """Track ``nbollama.session``'s engine: attach now, and again after every ``%nbollama load``."""
        with self.lock:
            if self._closed or self._unfollow is not None:
                return
            self._unfollow = on_engine_change(self.attach)
        self.attach(current_engine())

    def attach(self, engine: Engine | None) -> None:
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


class LiveView:
    """Mixin for a widget that can follow an engine on its own (``reset``/``update`` from a LiveLink).

    Put it before the ipywidgets base class; ``close()`` stops the updates,
    then closes the children and the widget itself.
    """

    _link: LiveLink | None = None

    def _follow(self, engine: Engine | None, interval: float) -> None:
        if engine is not None:
            self._link = LiveLink(self.reset, self.update, interval=interval)  # type: ignore[attr-defined]
            self._link.attach(engine)

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
        close_children(self)  # type: ignore[arg-type]
        super().close()  # type: ignore[misc]


def close_children(widget: widgets.Widget) -> None:
    """Close a container's children and its own layout/style models, not the container itself."""
    for child in getattr(widget, "children", ()) or ():
        close_tree(child)
    for name in ("layout", "style"):
        part = getattr(widget, name, None)
        if isinstance(part, widgets.Widget):
            part.close()


def close_tree(widget: widgets.Widget) -> None:
    """Close a widget and everything under it: each child, layout and style is a comm of its own."""
    close_children(widget)
    widget.close()
