"""What the in-kernel and the remote engine share, written once.

``EngineBase`` holds the books (totals by finish reason, recent requests, the
change counter), submitting (checks, all-or-none queueing), feeding
(``generate``/``agenerate``), cancelling, subscriptions and the close
skeleton. An engine adds what is its own through a few hooks: how a prompt
becomes a request (``_prepare``), how requests wait (``_enqueue``), how its
loop is woken (``_after_submit``), which handles are live, and how it stops.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar, cast

from ..exceptions import EngineClosedError, EngineError, InvalidParamsError, NbollamaError
from .feed import feed_agenerate, feed_generate, window_for
from .keeping import KeepsResults
from .metrics import ThroughputMeter
from .monitor import Monitor, Subscription
from .replay import (
    check_cache,
)
from .requests import FinishReason, Handle, Result, SamplingParams, check_request_params
from .snapshot import (
    SNAPSHOT_VERSION,
    CompletedRequest,
    EngineSnapshot,
    SlotSnapshot,
    Totals,
)

__all__ = [
    "EngineBase",
    "RequestBooks",
    "after_engines_closed",
    "prefix_hit_rate",
    "preview_of",
    "check_slot",
]

#: Characters of a prompt a view shows.
PREVIEW_CHARS = 80
_RECENT = 64
_RECENT_SHOWN = 16  # of them in a snapshot

_live_engines: weakref.WeakSet[EngineBase[Any]] = weakref.WeakSet()
_after_close: list[Callable[[], object]] = []


def after_engines_closed(hook: Callable[[], object]) -> None:
    """Run ``hook`` at interpreter exit, after every live engine was closed."""
    _after_close.append(hook)


@atexit.register
def _close_all_engines() -> None:
    """Kernel shutdown: stop the loops before the interpreter tears ctypes and sockets down."""
    for engine in list(_live_engines):
        with contextlib.suppress(Exception):
            engine.close()
    for hook in _after_close:
        with contextlib.suppress(Exception):
            hook()


def preview_of(prompt: str) -> str:
    """A prompt folded onto one line and cut to what a slot row shows."""
    return " ".join(prompt.split())[:PREVIEW_CHARS]


def prefix_hit_rate(totals: Totals) -> float:
    """Prompt tokens taken from a cache, over every prompt token (0 before any)."""
    prompt = totals["prompt_tokens"]
    return round(totals["cached_tokens"] / prompt, 4) if prompt else 0.0


def check_slot(slot: object, rows: int) -> int:
    """``slot`` if it names one of ``rows`` rows; ``InvalidParamsError`` (a ``ValueError``) otherwise."""
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < rows:
        raise InvalidParamsError(f"slot {slot!r} does not exist (this engine has slots 0..{rows - 1})")
    return slot


class RequestBooks:
    """Counts by outcome and tokens, kept under the engine's lock."""

    __slots__ = (
        "submitted",
        "completed",
        "cancelled",
        "errors",
        "prompt_tokens",
        "generated_tokens",
        "cached_tokens",
    )

    def __init__(self) -> None:
        self.submitted = self.completed = self.cancelled = self.errors = 0
        self.prompt_tokens = self.generated_tokens = self.cached_tokens = 0

    def ended(self, reason: FinishReason) -> None:
        if reason in ("stop", "length"):
            self.completed += 1
        elif reason == "cancelled":
            self.cancelled += 1
        else:
            self.errors += 1

    def as_dict(self) -> Totals:
        return Totals(
            submitted=self.submitted,
            completed=self.completed,
            cancelled=self.cancelled,
            errors=self.errors,
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens,
            cached_tokens=self.cached_tokens,
        )


class _Queued(Protocol):
    """What ``submit_many`` needs of an engine's request: its handle."""

    @property
    def handle(self) -> Handle: ...


R = TypeVar("R", bound=_Queued)


class EngineBase(KeepsResults, ABC, Generic[R]):
    """The engine protocol's shared half; subclasses set ``_thread`` and ``_monitor``, and fill the hooks."""

    _thread: threading.Thread
    _monitor: Monitor

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._seq = 0  # increases whenever something a view shows changed
        self._request_ids = itertools.count(1)
        self._totals = RequestBooks()
        self._meter = ThroughputMeter()
        self._recent: deque[CompletedRequest] = deque(maxlen=_RECENT)
        self._closing = False
        self._closed = False
        self._close_started = False
        self._close_done = threading.Event()
        #: the engine's name in the kernel ("default", or ``--as NAME``); results carry it
        self.name = ""

    # -- hooks ---------------------------------------------------------------------------

    def _check_params(self, params: dict[str, Any]) -> object:
        """Engine-specific checks of a call's parameters, before anything is prepared."""
        return None

    @abstractmethod
    def _prepare(
        self, prompt: str, sampling: SamplingParams, options: dict[str, Any], checked: object
    ) -> R:
        """A request for ``prompt``; one that cannot run comes back with its handle finished."""

    @abstractmethod
    def _enqueue(self, requests: Sequence[R]) -> None:
        """(Under the lock.) Queue every request, or raise ``QueueFullError`` and queue none."""

    def _after_submit(self) -> None:
        """(Outside the lock.) Wake the engine's loop."""

    @abstractmethod
    def _live_handles(self) -> list[Handle]:
        """(Under the lock.) The handles of every queued and running request."""

    def _badges_showing(self, now: float) -> int:
        """Rows still showing how their last request ended (their expiry changes the view)."""
        return 0

    def _closed_message(self) -> str:
        return "this engine was closed; load a new one (nbollama.Engine.load or %nbollama load)"

    def _begin_close(self) -> None:
        """(Under the lock, once.) Make the loop stop taking work."""

    def _stop(self) -> None:
        """(The first closer's thread.) Cancel what runs and join the engine's threads."""

    def _release(self) -> None:
        """(Always, last.) Free what the engine holds: a context, weights, connections."""

    # -- submitting ----------------------------------------------------------------------

    def submit(self, prompt: str, **params: Any) -> Handle:
        """Queue one prompt; returns at once with a ``Handle`` (parameters as for ``submit_many``)."""
        return self.submit_many([prompt], **params)[0]

    def submit_many(self, prompts: Iterable[str], **params: Any) -> list[Handle]:
        """Queue several prompts in ONE step, all or none; handles in input order.

        Parameters (all optional): ``max_tokens=256, temperature=0.8, top_k=40,
        top_p=0.95, min_p=0.05, repeat_penalty=1.0, repeat_last_n=64, seed=None,
        stop=(), priority=0, chat=False, system=None``. Raises ``QueueFullError``
        when the queue is full and ``InvalidParamsError`` for bad parameters,
        before anything is queued. A prompt that cannot run (empty, too long
        for a slot) does not raise: its handle finishes at once with
        ``finish_reason="error"``.
        """
        if isinstance(prompts, str):
            raise InvalidParamsError("submit_many() takes a list of prompts; for one prompt use submit()")
        self._check_open()
        sampling, options = check_request_params(params)
        checked = self._check_params(params)
        prompts = list(prompts)
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise InvalidParamsError(f"prompt must be a str, got {type(prompt).__name__}")
        cache = check_cache(options["cache"])
        requests = [self._prepare(p, sampling, options, checked) for p in prompts]
        failed = sum(1 for r in requests if r.handle.done())  # could not run: finished at once
        replayed = self._through_store(requests, sampling, options["output"], cache)
        runnable = [r for r in requests if not r.handle.done()]
        with self._lock:
            try:
                self._check_open()
                self._enqueue(runnable)
            except NbollamaError:  # closed, or the queue is full: none of them runs
                for request in runnable:
                    request.handle._finish("cancelled")
                raise
            self._totals.submitted += len(requests) - replayed  # a replayed request never reaches it
            self._totals.errors += failed
            self._seq += 1
        self._after_submit()
        return [r.handle for r in requests]

    def _next_request_id(self) -> int:
        return next(self._request_ids)

    @staticmethod
    def _fail_empty(handle: Handle, why: str = "the prompt is empty") -> None:
        handle._finish("error", error=why, exception=InvalidParamsError("empty prompt"))

    # -- feeding -------------------------------------------------------------------------

    @property
    def feed_window(self) -> int:
        """How many of one call's prompts ``generate`` keeps inside the engine at once."""
        return window_for(self._window_rows(), self._queue_limit())

    @abstractmethod
    def _window_rows(self) -> int:
        """The rows a call's prompts can run in at once (every reserved slot, or the in-flight limit)."""

    @abstractmethod
    def _queue_limit(self) -> int:
        """How many requests the engine's queue holds."""

    def generate(
        self, prompts: str | Iterable[str], *, progress: bool = False, **params: Any
    ) -> list[Result]:
        """Generate for any number of prompts and wait; results come in input order.

        The prompts are fed into the queue as it drains (at most
        ``max(4 x parallel, 64)`` of them inside the engine, never more than
        the queue holds), in big chunks, so a greedy call gives the same texts
        as one ``submit_many`` of them all. ``progress=True`` shows a progress
        bar (a live display in a notebook, a line on stderr elsewhere). Ctrl-C
        cancels what has not finished and raises ``KeyboardInterrupt``, whose
        ``.results`` holds every prompt's ``Result`` (finished ones whole).
        """
        if threading.current_thread() is self._thread:
            raise EngineError(
                "generate() cannot wait from the engine's own thread (a done-callback); use submit()"
            )
        return feed_generate(
            self.submit_many, prompts, params, window=self.feed_window, progress=progress,
            run=self._run_for(prompts, params),
        )

    async def agenerate(
        self, prompts: str | Iterable[str], *, progress: bool = False, **params: Any
    ) -> list[Result]:
        """``generate`` for event loops (asyncio, trio, anyio); cancelling the task cancels the requests."""
        return await feed_agenerate(
            self.submit_many, prompts, params, window=self.feed_window, progress=progress,
            run=self._run_for(prompts, params),
        )

    # -- cancelling --------------------------------------------------------

    def cancel_all(self) -> int:
        """Cancel every queued and running request; how many were cancelled."""
        with self._lock:
            handles = self._live_handles()
        return sum(1 for h in handles if h.cancel())

    # -- looking at it -------------------------------------------------------------------

    def _read_books(self) -> tuple[Totals, int, list[CompletedRequest]]:
        """(Under the lock.) Totals, the change counter and the last requests, for a snapshot."""
        return self._totals.as_dict(), self._seq, list(self._recent)[-_RECENT_SHOWN:]

    def _snapshot(
        self,
        *,
        slots: list[SlotSnapshot],
        queue_length: int,
        books: tuple[Totals, int, list[CompletedRequest]],
        **own: Any,
    ) -> EngineSnapshot:
        """The snapshot: the fields every engine fills alike, and the engine's ``own``."""
        totals, seq, recent = books
        snapshot = dict(
            v=SNAPSHOT_VERSION,
            time=time.time(),
            seq=seq,
            name=self.name,
            closed=self._closed,
            slots=slots,
            queue={"length": queue_length, "max": self._queue_limit()},
            throughput=round(self._meter.rate(), 2),
            throughput_window=self._meter.window,
            busy_slots=sum(1 for s in slots if s["state"] != "idle"),
            totals=totals,
            recent=recent,
            **own,
        )
        return cast(EngineSnapshot, snapshot)  # `own` holds the rest of the shape

    @property
    def closed(self) -> bool:
        return self._closed

    def subscribe(
        self, callback: Callable[[EngineSnapshot], object], *, interval: float = 0.25
    ) -> Subscription:
        """Call ``callback(snapshot)`` from a background thread when something changed,
        at most once per ``interval`` seconds (4 Hz by default)."""
        return self._monitor.subscribe(callback, interval)

    def _change_key(self) -> Hashable:
        """Cheap: what makes a new snapshot worth sending (state, throughput, an expiring badge)."""
        return (self._seq, self._rate_key(), self._badges_showing(time.monotonic()), self._closed)

    def _rate_key(self) -> float:
        return round(self._meter.rate(), 1)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- closing -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing or self._closed:
            raise EngineClosedError(self._closed_message())

    def close(self) -> None:
        """Cancel what is queued or running, stop the engine's threads and free what it holds.

        Safe to call twice, and from several threads at once (the second caller
        waits for the first); not from a done-callback, which runs on the
        engine's own thread.
        """
        if threading.current_thread() is self._thread:
            raise EngineError("close() cannot be called from the engine's own thread (a done-callback)")
        with self._lock:
            first = not self._close_started
            self._close_started = self._closing = True
            if first:
                self._seq += 1
                self._begin_close()
        if not first:
            self._close_done.wait()
            return
        try:
            self._stop()
            with self._lock:
                self._closed = True
                self._seq += 1
            self._monitor.stop()  # one last snapshot, with closed=True
        finally:
            self._closed = True
            try:
                self._release()
            finally:
                _live_engines.discard(self)
                self._close_done.set()

    def _track(self) -> None:
        """Close this engine at interpreter exit if nobody did."""
        _live_engines.add(self)


def error_of(reason: FinishReason, error: str | None) -> NbollamaError | None:
    """The exception a failed request's ``Result`` carries (none for other endings)."""
    return EngineError(error) if reason == "error" and error else None
