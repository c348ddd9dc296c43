"""Any number of prompts through an engine's bounded queue, in input order.

One ``submit_many`` of every prompt stops at ``max_queue`` (``QueueFullError``,
the guard against runaway submitters). A batch call should flow through it
instead: a ``Feeder`` keeps at most a window of its requests inside the engine
and tops the window up as they finish (backpressure). It tops up in big chunks
(half a window at least), so the queue never runs dry while prompts are left
and admission sees the batches one big submit would give: a greedy run gives
the same texts either way.

The feeder runs on the caller's thread (or a cell's background thread): that
is where prompts are tokenized, never on the engine's thread, whose done
callbacks only note which request finished. Finished handles are replaced by
their ``Result``, so memory per finished prompt is its result alone. Both the
in-kernel and the remote engine's ``generate``/``agenerate`` are these
functions over their own ``submit_many``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import anyio

from ..exceptions import EngineError, InvalidParamsError, QueueFullError
from .replay import StoreRun
from .requests import Handle, Result, _LoopWaker
from .results import Results

__all__ = [
    "UNSENT_ID",
    "Feeder",
    "window_for",
    "window_of",
    "unsent_result",
    "feed_generate",
    "feed_agenerate",
]

#: The id of a ``Result`` whose prompt was never sent (the call was cancelled first).
UNSENT_ID = 0
#: At least this many of a call's requests wait in the engine, or 4 per slot (see ``window_for``).
WINDOW_MIN = 64
WINDOW_PER_SLOT = 4
#: Seconds before a chunk refused by a queue that others filled is tried again (smaller).
RETRY_SECONDS = 0.05
#: Finished prompts a view can list as "latest".
LATEST = 8

SubmitMany = Callable[..., Sequence[Handle]]


def window_for(parallel: int, max_queue: int) -> int:
    """How many of one call's requests may be inside the engine at once (queued or running).

    Four per slot, at least 64, so the queue never runs dry between two top-ups;
    never more than ``max_queue``, so the feeder alone never meets a full queue.
    """
    return max(1, min(max_queue, max(WINDOW_PER_SLOT * parallel, WINDOW_MIN)))


def window_of(engine: Any) -> int:
    """The window ``generate`` uses on ``engine`` (its ``feed_window``). A ``%%generate`` cell
    feeds with the same window, so a cell and ``generate()`` on the same prompts form the same
    batches."""
    return int(engine.feed_window)


def unsent_result(prompt: str) -> Result:
    """What a prompt the call never sent ends as: cancelled, no text, id ``UNSENT_ID``."""
    return Result(
        id=UNSENT_ID,
        prompt=prompt,
        text="",
        prompt_tokens=0,
        completion_tokens=0,
        finish_reason="cancelled",
        error=None,
        ttft=None,
        tpot=None,
        queue_wait=0.0,
        total_time=0.0,
        slot=None,
    )


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C while a chunk is handed over: a KeyboardInterrupt between the engine
    queueing it and the feeder recording its handles would strand requests nobody cancels."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt


class Feeder:
    """One call's prompts, fed into an engine's queue as it drains; results in input order.

    ``feed()`` sends what fits, ``poll(timeout)`` collects finished requests and
    feeds, ``run()`` does both until every prompt finished. Views read ``total``,
    ``done``, ``errors``, ``tokens``, ``running()`` and ``latest()`` on the same
    thread. ``cancel()`` stops feeding and cancels what is in the engine.
    """

    def __init__(
        self,
        prompts: str | Iterable[str],
        submit_many: SubmitMany,
        params: Mapping[str, Any] | None = None,
        *,
        window: int,
        run: StoreRun | None = None,
    ) -> None:
        """``run``: the result store's record of this call (``engine.open_store_run``): its
        finished rows are noted as they end, and an unfinished twin's rows are replayed."""
        self.prompts: list[str] = [prompts] if isinstance(prompts, str) else list(prompts)
        for number, prompt in enumerate(self.prompts):
            if not isinstance(prompt, str):
                raise InvalidParamsError(
                    f"prompt {number} must be a str, got {type(prompt).__name__}"
                )
        if window < 1:
            raise InvalidParamsError(f"window={window}: must be >= 1")
        self._submit = submit_many
        self._params = dict(params or {})
        self.store_run = run
        if run is not None:
            self._params["cache"] = run
        self.replayed = 0  # results the store gave instead of the engine
        self.window = window
        self._refill = max(1, window // 2)  # top up by half a window at least
        self._cap = window  # the chunk size, halved while others keep the queue full
        self._retry_at = 0.0
        self._lock = threading.RLock()  # items, live, sent, stopped: feeding vs cancelling
        self._items: list[Handle | Result | None] = [None] * len(self.prompts)
        self._live: dict[int, Handle] = {}  # index -> handle inside the engine
        self._sent = 0
        self._stopped = False
        self._cond = threading.Condition()  # the finished indices, from done callbacks
        self._finished: deque[int] = deque()
        self._wake_after = 1
        self._listeners: list[Callable[[], object]] = []
        self._latest: deque[int] = deque(maxlen=LATEST)
        self.done = self.errors = self.cancelled = self.tokens = 0
        self.forced = 0  # of ``tokens``, those a format forced (jump-forward), finished prompts only
        self.started = time.perf_counter()
        self.ended: float | None = None

    # -- state ------------------------------------------------------------------------------

    @property
    def total(self) -> int:
        return len(self.prompts)

    @property
    def sent(self) -> int:
        return self._sent

    @property
    def stopped(self) -> bool:
        """True once ``cancel`` was called: nothing more is sent."""
        return self._stopped

    @property
    def finished(self) -> bool:
        """Every prompt finished (or, after ``cancel``, every sent one did)."""
        with self._lock:
            return not self._live and (self._stopped or self._sent == len(self.prompts))

    @property
    def handles(self) -> list[Handle]:
        """The handles inside the engine now (queued or running), in input order."""
        with self._lock:
            return [self._live[i] for i in sorted(self._live)]

    @property
    def items(self) -> list[Handle | Result | None]:
        """Per prompt: its ``Result`` once finished, its ``Handle`` while in the engine, None before."""
        with self._lock:
            return list(self._items)

    def running(self) -> list[tuple[int, Handle]]:
        """(index, handle) of this call's requests that hold a slot now."""
        with self._lock:
            live = sorted(self._live.items())
        return [(i, h) for i, h in live if h.slot is not None and not h.done()]

    def latest(self) -> list[tuple[int, Result]]:
        """(index, result) of the last few finished prompts, newest first."""
        with self._lock:
            return [
                (i, item)
                for i in reversed(self._latest)
                if isinstance(item := self._items[i], Result)
            ]

    @property
    def elapsed(self) -> float:
        return (self.ended or time.perf_counter()) - self.started

    def tokens_so_far(self) -> int:
        """Completion tokens of the finished prompts and of those running."""
        with self._lock:
            live = list(self._live.values())
        return self.tokens + sum(h.completion_tokens for h in live)

    # -- feeding ----------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[], object]) -> None:
        """Call ``listener()`` (from the engine's thread: keep it short) when ``poll`` has work."""
        self._listeners.append(listener)

    def feed(self) -> int:
        """Send the next chunk if the window has room for one; how many prompts were sent.

        The first call raises what ``submit_many`` raises (bad parameters, a
        closed engine) before anything is queued; a queue filled by others is
        waited out, not raised.
        """
        with self._lock:
            left = len(self.prompts) - self._sent
            room = self.window - len(self._live)
            if self._stopped or left <= 0 or room < min(self._refill, left):
                return 0
            if self._retry_at and time.monotonic() < self._retry_at:
                return 0
            start = self._sent
            count = min(room, left, self._cap)
            with _interrupts_held():
                try:
                    handles = list(
                        self._submit(self.prompts[start : start + count], **self._params)
                    )
                except QueueFullError:  # others filled it: wait, and try a smaller chunk
                    self._cap = max(1, count // 2)
                    self._retry_at = time.monotonic() + RETRY_SECONDS
                    return 0
                self._cap = self.window
                self._retry_at = 0.0
                self._sent += len(handles)
                for offset, handle in enumerate(handles):
                    self._items[start + offset] = handle
                    self._live[start + offset] = handle
            for offset, handle in enumerate(handles):
                handle.add_done_callback(partial(self._on_done, start + offset))
            return len(handles)

    def _on_done(self, index: int, _handle: Handle) -> None:
        """(The engine's thread.) Note it; wake the feeder only when that lets it do something."""
        with self._cond:
            self._finished.append(index)
            wake = len(self._finished) >= self._wake_after
            if wake:
                self._cond.notify_all()
        if wake:
            for listener in self._listeners:
                listener()

    def _collect(self) -> None:
        with self._cond:
            finished = list(self._finished)
            self._finished.clear()
        with self._lock:
            for index in finished:
                handle = self._live.pop(index, None)
                if handle is not None:
                    self._record(index, handle.result(), handle.store_key)

    def _record(self, index: int, result: Result, key: str | None = None) -> None:
        self._items[index] = result
        self._latest.append(index)
        self.done += 1
        if result.cached:
            self.replayed += 1
        else:
            self.tokens += result.completion_tokens
            self.forced += result.forced_tokens
        if self.store_run is not None and key is not None and result.ok:
            self.store_run.store.row_finished(self.store_run.key, index, key)
        if result.finish_reason == "error":
            self.errors += 1
        elif result.finish_reason == "cancelled":
            self.cancelled += 1

    def _arm(self) -> None:
        """How many more requests must finish before a top-up (or the end) is possible."""
        with self._lock:
            live = len(self._live)
            left = 0 if self._stopped else len(self.prompts) - self._sent
        need = live - (self.window - min(self._refill, left)) if left else live
        with self._cond:
            self._wake_after = max(1, need)

    def ready(self) -> bool:
        """Whether enough requests finished since the last ``poll`` for it to do something."""
        with self._cond:
            return len(self._finished) >= self._wake_after

    def poll(self, timeout: float = 0.0) -> bool:
        """Collect finished requests and top up; wait up to ``timeout`` s for more to finish
        if that was all. True when every prompt finished."""
        self._collect()
        self.feed()
        if self.finished:
            return self._end()
        if timeout > 0:
            if self._retry_at:
                timeout = max(0.001, min(timeout, self._retry_at - time.monotonic()))
            self._arm()
            with self._cond:
                if len(self._finished) < self._wake_after:
                    self._cond.wait(timeout)
            self._collect()
            self.feed()
        return self._end() if self.finished else False

    def _end(self) -> bool:
        if self.ended is None:
            self.ended = time.perf_counter()
            if self.store_run is not None and not self._stopped:
                self.store_run.store.finish_run(self.store_run.key)  # an identical run later starts afresh
        return True

    @property
    def store_note(self) -> str:
        """What the store gave: "resumed 3,812 of 5,000 from the store", "412 cached", or ""."""
        if not self.replayed:
            return ""
        if self.store_run is not None and self.store_run.resumed_rows:
            return f"resumed {self.replayed:,} of {self.total:,} from the store"
        return f"{self.replayed:,} cached"

    def run(self, tick: Callable[[], object] | None = None, interval: float = 0.25) -> list[Result]:
        """Feed and collect until every prompt finished, calling ``tick()`` every ``interval`` s."""
        next_tick = time.monotonic() + interval
        while not self.poll(max(0.001, next_tick - time.monotonic()) if tick else interval):
            if tick is not None and time.monotonic() >= next_tick:
                tick()
                next_tick = time.monotonic() + interval
        return self.results()

    def results(self) -> list[Result]:
        """One ``Result`` per prompt, in input order (unsent ones: cancelled, id ``UNSENT_ID``).

        Call it once ``finished``; a request still running raises ``RuntimeError``.
        """
        self._collect()
        with self._lock:
            for index, handle in list(self._live.items()):
                if not handle.done():
                    raise EngineError(
                        f"prompt {index} is still running; wait for the feeder to finish"
                    )
                del self._live[index]
                self._record(index, handle.result(), handle.store_key)
            return [
                item if isinstance(item, Result) else unsent_result(self.prompts[i])
                for i, item in enumerate(self._items)
            ]

    # -- cancelling -------------------------------------------------------------------------

    def stop(self) -> int:
        """Send nothing more and cancel what is inside the engine; how many prompts will not finish
        normally (cancelled ones plus those never sent). Does not wait."""
        with self._lock:
            first = not self._stopped
            self._stopped = True
            live = list(self._live.values())
            unsent = len(self.prompts) - self._sent if first else 0
        with self._cond:
            self._wake_after = 1
            self._cond.notify_all()
        return unsent + sum(1 for handle in live if handle.cancel())

    def cancel(self, timeout: float = 10.0) -> list[Result]:
        """``stop()``, then wait (up to ``timeout`` s) for the cancelled requests; every result.

        What finished keeps its result, what ran keeps its partial text (``cancelled``).
        Raises ``TimeoutError`` if the engine did not end the requests in time.
        """
        self.stop()
        deadline = time.monotonic() + timeout
        for handle in self.handles:
            handle.result(max(0.001, deadline - time.monotonic()))
        self._end()
        return self.results()


def _attach(exc: BaseException, results: list[Result]) -> None:
    """Ctrl-C keeps what finished: the ``Results`` ride on the KeyboardInterrupt."""
    with contextlib.suppress(Exception):
        exc.results = Results(results)  # type: ignore[attr-defined]  # added to the exception


def feed_generate(
    submit_many: SubmitMany,
    prompts: str | Iterable[str],
    params: Mapping[str, Any],
    *,
    window: int,
    progress: bool = False,
    run: StoreRun | None = None,
) -> list[Result]:
    """``generate`` for any engine: feed, wait, results in input order.

    Ctrl-C cancels what has not finished and raises ``KeyboardInterrupt`` with
    ``.results``: every prompt's ``Result`` (finished ones whole, running ones
    with their partial text, unsent ones empty), all ``cancelled`` but the finished.
    """
    feeder = Feeder(prompts, submit_many, params, window=window, run=run)
    feeder.feed()  # bad parameters raise here, before anything is queued
    reporter = None
    if progress:
        from .progress import progress_reporter

        reporter = progress_reporter(feeder)
    try:
        results = feeder.run(reporter.update if reporter is not None else None)
    except BaseException as exc:
        try:
            results = feeder.cancel()
        except BaseException:
            feeder.stop()
            raise exc from None
        if isinstance(exc, KeyboardInterrupt):
            _attach(exc, results)
        if reporter is not None:
            reporter.close()
        raise
    if reporter is not None:
        reporter.close()
    return results


async def feed_agenerate(
    submit_many: SubmitMany,
    prompts: str | Iterable[str],
    params: Mapping[str, Any],
    *,
    window: int,
    progress: bool = False,
    interval: float = 0.25,
    run: StoreRun | None = None,
) -> list[Result]:
    """``agenerate`` for any engine: the same feeding from an event loop (asyncio, trio).

    Cancelling the task cancels what has not finished and sends nothing more.
    """
    feeder = Feeder(prompts, submit_many, params, window=window, run=run)
    feeder.feed()
    reporter = None
    if progress:
        from .progress import progress_reporter

        reporter = progress_reporter(feeder)
    waker = _LoopWaker()
    feeder.add_listener(lambda: waker.wake())
    next_tick = time.monotonic() + interval
    try:
        while True:
            waker.event = anyio.Event()
            if feeder.poll(0.0):
                break
            feeder._arm()
            if not feeder.ready():
                with anyio.move_on_after(max(0.001, next_tick - time.monotonic())):
                    await waker.event.wait()
            if reporter is not None and time.monotonic() >= next_tick:
                reporter.update()
                next_tick = time.monotonic() + interval
    except BaseException:
        feeder.stop()
        if reporter is not None:
            reporter.close()
        raise
    if reporter is not None:
        reporter.close()
    return feeder.results()
