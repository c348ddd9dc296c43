"""The server's state for the views: one background thread, at most 2 Hz, only while something watches.

The engine counts its snapshot subscribers (dashboards, side panels); the
poller runs while that count is above zero and sleeps on a condition
otherwise, so a notebook that only generates costs the server nothing extra.
A failed poll is handed to the engine as an error (the views say the server
is unreachable and why) and logged once per kind of failure, never printed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .._api.monitor import Monitor, Subscription
from .._api.snapshot import EngineSnapshot
from .._logging import logger
from ._adapters import ServerState

__all__ = ["POLL_INTERVAL", "StatePoller", "WatchedMonitor"]

#: Seconds between two polls at least (2 Hz at most).
POLL_INTERVAL = 0.5


class StatePoller:
    """Polls ``poll()`` every ``interval`` seconds while ``watchers > 0``; hands each outcome to ``deliver``."""

    def __init__(
        self,
        name: str,
        poll: Callable[[], ServerState],
        deliver: Callable[[ServerState | None, str | None], None],
        describe: Callable[[BaseException], str],
        *,
        interval: float = POLL_INTERVAL,
    ) -> None:
        self.name = name
        self.interval = max(POLL_INTERVAL, interval)
        self._poll = poll
        self._deliver = deliver
        self._describe = describe
        self._cond = threading.Condition()
        self._watchers = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._logged: set[str] = set()
        self.polls = 0  # how many polls ran (tests check the rate)

    @property
    def watchers(self) -> int:
        return self._watchers

    @property
    def active(self) -> bool:
        return self._watchers > 0 and not self._stopping

    def set_watchers(self, count: int) -> None:
        with self._cond:
            self._watchers = count
            if count > 0 and self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name=f"nbollama-remote-poll-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def poll_once(self) -> tuple[ServerState | None, str | None]:
        """One poll, its failure described instead of raised."""
        try:
            state = self._poll()
        except Exception as exc:
            reason = self._describe(exc)
            kind = type(exc).__name__
            if kind not in self._logged:
                self._logged.add(kind)
                logger.warning("nbollama: polling %s failed: %s (logged once per kind of failure)", self.name, reason)
            return None, reason
        self._logged.clear()
        return state, None

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and self._watchers <= 0:
                        self._cond.wait()
                    if self._stopping:
                        return
                started = time.monotonic()
                state, error = self.poll_once()
                self.polls += 1
                with self._cond:
                    if self._stopping:
                        return
                try:
                    self._deliver(state, error)
                except Exception:
                    logger.warning("nbollama: taking in the state of %s failed", self.name, exc_info=True)
                with self._cond:
                    remaining = self.interval - (time.monotonic() - started)
                    if remaining > 0 and not self._stopping:
                        self._cond.wait(remaining)
        except Exception:  # never print from this thread
            logger.warning("nbollama: the state poller of %s stopped", self.name, exc_info=True)


class WatchedMonitor(Monitor):
    """The core ``Monitor``, also telling how many subscribers it has (the poller runs while any do)."""

    def __init__(self, *args: Any, on_watchers: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_watchers = on_watchers
        self._watching: set[Subscription] = set()
        self._watch_lock = threading.Lock()

    def subscribe(self, callback: Callable[[EngineSnapshot], object], interval: float) -> Subscription:
        subscription = super().subscribe(callback, interval)
        with self._watch_lock:
            self._watching.add(subscription)
            count = len(self._watching)
        self._on_watchers(count)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        super().unsubscribe(subscription)
        with self._watch_lock:
            self._watching.discard(subscription)
            count = len(self._watching)
        self._on_watchers(count)
