"""A remote engine: llama-server, Ollama, vLLM or an OpenAI-compatible server behind the engine protocol.

It implements ``EngineLike`` and hands out real ``Handle``/``Result`` objects,
so ``%%generate``, ``nbollama.generate``, the dashboard, the side panel,
``%nbollama status`` and ``bench`` work on it unchanged.

Threads and who owns what:

* the caller's thread checks parameters and queues (``submit_many``), or cancels;
* the engine's event-loop thread (``nbollama-remote-N``) sends at most
  ``max_inflight`` requests at once through one ``httpx.AsyncClient``, reads
  their streams and finishes their handles; the rest wait in nbollama's own
  queue (highest priority first, FIFO within one), so a 200-prompt cell does
  not open 200 connections. Cancelling a request that was sent closes its
  stream, which is how every one of these servers is told to stop;
* a poller thread (``nbollama-remote-poll-N``) reads the server's state at
  2 Hz at most, only while a view is subscribed;
* the monitor thread (the core's ``Monitor``) turns changes into snapshots.

``_lock`` guards the queue, the lanes and the books; nothing blocking is done
under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import os
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from .. import memory as _memory
from .._core._config import DEFAULT_MAX_QUEUE, MAX_QUEUE_ENV
from .._core._monitor import Subscription
from .._core._requests import FinishReason, Handle, Result, SamplingParams, check_request_params
from .._core._snapshot import (
    SNAPSHOT_VERSION,
    CompletedRequest,
    EngineSnapshot,
    MemoryFigures,
    RemoteFigures,
    SlotSnapshot,
    completed_request,
)
from .._logging import logger
from ..exceptions import (
    EngineClosedError,
    EngineError,
    InvalidParamsError,
    NbollamaError,
    PromptTooLongError,
    QueueFullError,
    RemoteError,
)
from ..metrics import ThroughputMeter
from ._adapters import Adapter, Event, ServerSlot, ServerState, adapter_for
from ._detect import ServerInfo
from ._http import STREAM_HEADERS, Connection, error_message
from ._poller import StatePoller, WatchedMonitor

__all__ = ["RemoteEngine", "RemoteHandle", "DEFAULT_MAX_INFLIGHT", "BUSY_RETRIES"]

#: Requests in flight when the server does not say how many it runs at once.
DEFAULT_MAX_INFLIGHT = 4
#: Tries after a "server busy" answer (HTTP 503 from Ollama, 429 from any), with doubling waits.
BUSY_RETRIES = 5
BUSY_FIRST_WAIT = 0.25
_PREVIEW_CHARS = 80
_BADGE_SECONDS = 2.0
_RECENT = 64
_STALE_STATE = 1.0  # seconds: an older state is polled again when nothing polls it in the background
_REQUEST_FIELDS = frozenset({"priority", "chat", "system"})
_CONTEXT_WORDS = re.compile(r"context (size|length|window)|exceed_context|too long|maximum context", re.IGNORECASE)

_live_engines: weakref.WeakSet[RemoteEngine] = weakref.WeakSet()


def _close_all() -> None:
    for engine in list(_live_engines):
        with contextlib.suppress(Exception):
            engine.close()


import atexit  # noqa: E402

atexit.register(_close_all)


class RemoteHandle(Handle):
    """A ``Handle`` whose request runs on a server; adds when it was sent and the server's slot."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent_at: float | None = None  # perf_counter() when the HTTP request went out
        self.server_slot: int | None = None  # the llama-server slot serving it, once known
        self.cached_tokens = 0  # prompt tokens the server took from its cache, when it says

    def _place(self, slot: int | None) -> None:
        """Show the request on ``slot`` without touching its status."""
        with self._cond:
            if self._slot == slot:
                return
            self._slot = slot
        self._notify()

    @property
    def ttft_from_send(self) -> float | None:
        """Seconds from sending to the first token: what one client of the server waits."""
        first = self.timing.first_token
        if first is None or self.sent_at is None:
            return None
        return first - self.sent_at


@dataclass(eq=False)
class _Request:
    handle: RemoteHandle
    path: str
    body: dict[str, Any]
    priority: int
    preview: str
    max_tokens: int
    order: int
    lane: int | None = None
    task: asyncio.Task[None] | None = None
    started: bool = False  # the server began the request (progress event or a token)
    finish: str | None = None
    cancel_requested: bool = False
    prompt_known: bool = False
    rates: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=32))

    @property
    def id(self) -> int:
        return self.handle.id


@dataclass
class _Ended:
    """How a row ended its last request (shown for a moment, like the local engine's badges)."""

    badge: str
    request_id: int
    preview: str
    prompt_tokens: int | None
    cached_tokens: int | None
    decoded: int
    max_tokens: int
    at: float  # monotonic


class _Busy(Exception):
    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Failed(Exception):
    def __init__(self, error: NbollamaError) -> None:
        super().__init__(str(error))
        self.error = error


class _Totals:
    __slots__ = ("submitted", "completed", "cancelled", "errors", "prompt_tokens", "generated_tokens", "cached_tokens")

    def __init__(self) -> None:
        self.submitted = self.completed = self.cancelled = self.errors = 0
        self.prompt_tokens = self.generated_tokens = self.cached_tokens = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def _max_queue() -> int:
    raw = os.environ.get(MAX_QUEUE_ENV)
    if not raw:
        return DEFAULT_MAX_QUEUE
    try:
        value = int(raw)
    except ValueError:
        raise InvalidParamsError(f"{MAX_QUEUE_ENV}={raw!r} is not a whole number") from None
    if value < 1:
        raise InvalidParamsError(f"{MAX_QUEUE_ENV}={value} must be >= 1")
    return value


class RemoteEngine:
    """The engine protocol over HTTP; make one with ``nbollama.connect(url)``."""

    _ids = itertools.count(1)

    def __init__(
        self,
        connection: Connection,
        info: ServerInfo,
        *,
        max_inflight: int | None = None,
        max_queue: int | None = None,
        connect_seconds: float = 0.0,
    ) -> None:
        if max_inflight is not None and (not isinstance(max_inflight, int) or isinstance(max_inflight, bool) or max_inflight < 1):
            raise InvalidParamsError(f"max_inflight={max_inflight!r}: must be a whole number >= 1")
        self.id = next(self._ids)
        self._connection = connection
        self._info = info
        self._adapter: Adapter = adapter_for(info)
        if max_inflight is not None:
            self._inflight_reason = f"max_inflight={max_inflight}, as asked"
        elif info.parallel is not None:
            self._inflight_reason = f"the server's {info.parallel} slots" if info.kind == "llama-server" else f"the server's parallel, {info.parallel}"
        else:
            self._inflight_reason = f"default {DEFAULT_MAX_INFLIGHT}: the server does not say how many it runs at once"
        self._max_inflight = max_inflight or info.parallel or DEFAULT_MAX_INFLIGHT
        self._max_queue = max_queue if max_queue is not None else _max_queue()
        self._connect_seconds = connect_seconds
        self._lock = threading.RLock()
        self._queue: list[tuple[int, int, _Request]] = []  # (-priority, order, request)
        self._queued: dict[int, _Request] = {}
        self._inflight: dict[int, _Request] = {}
        self._lanes: list[_Request | None] = [None] * self._max_inflight
        self._ended_rows: dict[int, _Ended] = {}  # row -> how its last request of ours ended
        self._order = itertools.count()
        self._request_ids = itertools.count(1)
        self._seq = 0
        self._meter = ThroughputMeter()
        self._totals = _Totals()
        self._recent: deque[CompletedRequest] = deque(maxlen=_RECENT)
        self._closing = False
        self._closed = False
        self._close_done = threading.Event()
        self._state: ServerState | None = None
        self._state_error: str | None = None
        self._state_key: Hashable = None
        self._slot_rates: dict[int, float] = {}
        self._slot_marks: dict[int, tuple[int | None, int, float]] = {}  # slot -> (task, decoded, mono)
        self._server_throughput: float | None = None
        self._slot_of: dict[int, int] = {}  # request id -> llama-server slot
        self._poll_client = connection.sync_client()
        self._poll_lock = threading.Lock()
        self._last_poll = 0.0
        self._aclient: httpx.AsyncClient | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"nbollama-remote-{self.id}", daemon=True)
        self._poller = StatePoller(
            f"{info.kind}-{self.id}", self._poll_server, self._take_state, connection.describe
        )
        self._monitor = WatchedMonitor(
            f"remote-{self.id}",
            self.snapshot,
            self._change_key,
            lambda: self._closed,
            on_watchers=self._poller.set_watchers,
        )
        self._thread.start()
        _live_engines.add(self)

    # -- what it is ----------------------------------------------------------------------

    @property
    def info(self) -> ServerInfo:
        return self._info

    @property
    def kind(self) -> str:
        return self._info.kind

    @property
    def url(self) -> str:
        """The server's URL, credentials redacted."""
        return self._connection.url

    @property
    def model_name(self) -> str:
        return self._info.model

    @property
    def parallel(self) -> int:
        """Rows the views show: the server's slots (llama-server with /slots), else the in-flight limit."""
        if self._rows_are_server_slots():
            state = self._state
            if state is not None and state.slots:
                return len(state.slots)
            return self._info.parallel or self._max_inflight
        return max(self._max_inflight, len(self._lanes))

    @property
    def server_parallel(self) -> int | None:
        """The server's own parallel when it says (llama-server's total_slots), else None."""
        return self._info.parallel

    @property
    def max_inflight(self) -> int:
        return self._max_inflight

    @property
    def max_inflight_reason(self) -> str:
        return self._inflight_reason

    @property
    def ctx(self) -> int | None:
        return self._info.ctx

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def summary(self) -> str:
        """The one line that says what was found: kind, model, the server's parallel, the context."""
        info = self._info
        version = f" {info.version}" if info.version and info.kind != "llama-server" else ""
        ctx_word = "ctx/slot" if info.kind == "llama-server" else "ctx"
        extras = []
        if info.kind == "llama-server":
            extras.append(f"/slots={'on' if info.slots_endpoint else 'off'}")
            extras.append(f"/metrics={'on' if info.metrics_endpoint else 'off (start it with --metrics)'}")
        elif info.kind == "vllm":
            extras.append(f"/metrics={'on' if info.metrics_endpoint else 'off'}")
        if info.host_is_local:
            extras.append("host=this machine")
        return (
            f"nbollama: connected to {info.kind}{version} at {self.url} model={info.model} "
            f"parallel={info.describe_parallel()} {ctx_word}={info.describe_ctx()} "
            f"max-inflight={self._max_inflight} ({self._inflight_reason})"
            + (f" {' '.join(extras)}" if extras else "")
            + f" connect={self._connect_seconds:.1f}s"
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"max_inflight={self._max_inflight}"
        return f"<nbollama.RemoteEngine {self.kind} {self.url} {self.model_name!r} {state}>"

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_max_inflight(self, n: int, *, reason: str | None = None) -> None:
        """Change how many requests go to the server at once (the sweep tries several)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InvalidParamsError(f"max_inflight={n!r}: must be a whole number >= 1")
        with self._lock:
            self._max_inflight = n
            self._inflight_reason = reason or f"max_inflight={n}, as set"
            used = max((i for i, r in enumerate(self._lanes) if r is not None), default=-1)
            size = max(n, used + 1)
            if size > len(self._lanes):
                self._lanes.extend([None] * (size - len(self._lanes)))
            else:
                del self._lanes[size:]
            self._seq += 1
        self._call_in_loop(self._pump)

    # -- submitting ----------------------------------------------------------------------

    def submit(self, prompt: str, **params: Any) -> RemoteHandle:
        """Queue one prompt; parameters as for ``Engine.submit`` (see ``submit_many``)."""
        return self.submit_many([prompt], **params)[0]

    def submit_many(self, prompts: Iterable[str], **params: Any) -> list[RemoteHandle]:  # type: ignore[override]
        """Queue several prompts in one step, all or none; handles in input order.

        Parameters as for the in-kernel engine. ``max_tokens`` is always sent;
        every other sampling parameter only when given, so the server's (and the
        model's) own defaults hold for the rest. A parameter this kind of server
        has no word for raises ``InvalidParamsError`` before anything is sent.
        """
        if isinstance(prompts, str):
            raise InvalidParamsError("submit_many() takes a list of prompts; for one prompt use submit()")
        self._check_open()
        sampling, options = check_request_params(params)
        given = set(params) - _REQUEST_FIELDS
        self._adapter.check(given)
        prompts = list(prompts)
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise InvalidParamsError(f"prompt must be a str, got {type(prompt).__name__}")
        requests = [self._prepare(p, sampling, given, options) for p in prompts]
        runnable = [r for r in requests if not r.handle.done()]
        with self._lock:
            self._check_open()
            if len(self._queued) + len(runnable) > self._max_queue:
                for request in requests:
                    if not request.handle.done():
                        request.handle._finish("cancelled")
                raise QueueFullError(
                    f"nbollama's queue for {self.url} holds {self._max_queue} requests ({MAX_QUEUE_ENV}); "
                    f"{len(self._queued)} are waiting and {len(runnable)} more were asked for"
                )
            for request in runnable:
                heapq.heappush(self._queue, (-request.priority, request.order, request))
                self._queued[request.id] = request
            self._totals.submitted += len(requests)
            self._totals.errors += len(requests) - len(runnable)
            self._seq += 1
        self._call_in_loop(self._pump)
        return [r.handle for r in requests]

    def _prepare(self, prompt: str, sampling: SamplingParams, given: set[str], options: dict[str, Any]) -> _Request:
        handle = RemoteHandle(next(self._request_ids), prompt, 0, sampling.max_tokens, self._cancel)
        path, body = self._adapter.build(
            prompt, sampling, given, chat=bool(options["chat"]), system=options["system"]
        )
        request = _Request(
            handle=handle,
            path=path,
            body=body,
            priority=int(options["priority"]),
            preview=" ".join(prompt.split())[:_PREVIEW_CHARS],
            max_tokens=sampling.max_tokens,
            order=next(self._order),
        )
        if not prompt.strip() and not options["chat"]:
            handle._finish("error", error="the prompt is empty", exception=InvalidParamsError("empty prompt"))
        return request

    def generate(self, prompts: str | Iterable[str], *, progress: bool = False, **params: Any) -> list[Result]:
        """Any number of prompts, fed through nbollama's queue as it drains; results in input order.

        As ``Engine.generate``: ``progress=True`` shows a progress bar; Ctrl-C
        cancels what has not finished and raises ``KeyboardInterrupt`` with ``.results``.
        """
        if threading.current_thread() is self._thread:
            raise EngineError("generate() cannot wait on the engine's own thread (a done-callback); use submit()")
        from .._feed import feed_generate, window_of

        window = window_of(self)
        return feed_generate(self.submit_many, prompts, params, window=window, progress=progress)

    async def agenerate(
        self, prompts: str | Iterable[str], *, progress: bool = False, **params: Any
    ) -> list[Result]:
        """``generate`` for event loops; cancelling the task cancels the requests."""
        from .._feed import feed_agenerate, window_of

        window = window_of(self)
        return await feed_agenerate(self.submit_many, prompts, params, window=window, progress=progress)

    # -- the event loop --------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        except BaseException:
            logger.warning("nbollama: the event loop of %s stopped", self.url, exc_info=True)
        finally:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _call_in_loop(self, callback: Callable[..., object], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the loop is closed: the engine is closing

    def _pump(self) -> None:
        """(Loop thread.) Send queued requests while fewer than ``max_inflight`` are open."""
        sent: list[_Request] = []
        with self._lock:
            while self._queue and len(self._inflight) < self._max_inflight and not self._closing:
                _, _, request = heapq.heappop(self._queue)
                if self._queued.pop(request.id, None) is None:
                    continue  # cancelled while queued
                lane = next((i for i, r in enumerate(self._lanes) if r is None), None)
                if lane is None:
                    lane = len(self._lanes)
                    self._lanes.append(None)
                self._lanes[lane] = request
                request.lane = lane
                self._inflight[request.id] = request
                sent.append(request)
            if sent:
                self._seq += 1
        for request in sent:
            request.task = self._loop.create_task(self._serve(request))

    def _client(self) -> httpx.AsyncClient:
        if self._aclient is None:
            self._aclient = self._connection.async_client(max(self._max_inflight, 8))
        return self._aclient

    async def _serve(self, request: _Request) -> None:
        """(Loop thread.) One request from sending to its result, whatever happens."""
        handle = request.handle
        try:
            wait = BUSY_FIRST_WAIT
            for attempt in range(BUSY_RETRIES + 1):
                try:
                    await self._stream(request)
                    break
                except _Busy as busy:
                    if attempt >= BUSY_RETRIES:
                        raise _Failed(
                            QueueFullError(
                                f"{self.url}: the server stayed busy after {BUSY_RETRIES + 1} tries "
                                f"over {self._busy_span():.1f} s ({busy})"
                            )
                        ) from None
                    await asyncio.sleep(busy.retry_after if busy.retry_after is not None else wait)
                    wait *= 2
            if request.finish is None:
                raise _Failed(RemoteError(self.url, "the server ended the stream before the request finished"))
            self._end(request, "length" if request.finish == "length" else "stop")
        except asyncio.CancelledError:
            self._end(request, "cancelled")
        except _Failed as failed:
            self._end(request, "error", error=str(failed.error), exception=failed.error)
        except httpx.HTTPError as exc:
            error = RemoteError(self.url, self._connection.describe(exc))
            self._end(request, "error", error=str(error), exception=error)
        except Exception as exc:  # a bug or a server answer we cannot read: this request alone fails
            logger.warning("nbollama: request %s to %s failed", handle.id, self.url, exc_info=True)
            error = RemoteError(self.url, f"{type(exc).__name__}: {exc}")
            self._end(request, "error", error=str(error), exception=error)
        finally:
            with self._lock:
                self._inflight.pop(request.id, None)
                if request.lane is not None and request.lane < len(self._lanes) and self._lanes[request.lane] is request:
                    self._lanes[request.lane] = None
                if len(self._lanes) > self._max_inflight:
                    while len(self._lanes) > self._max_inflight and self._lanes[-1] is None:
                        self._lanes.pop()
                self._slot_of.pop(request.id, None)
                self._seq += 1
            self._pump()

    @staticmethod
    def _busy_span() -> float:
        return sum(BUSY_FIRST_WAIT * 2**i for i in range(BUSY_RETRIES))

    async def _stream(self, request: _Request) -> None:
        handle = request.handle
        if request.cancel_requested:
            raise asyncio.CancelledError
        handle.sent_at = time.perf_counter()
        if not self._adapter.server_slots:
            handle.timing.started = handle.sent_at  # queue_wait: nbollama's queue (the server says no more)
            handle._set_running(request.lane, "sent")  # type: ignore[arg-type]
        else:
            handle._set_running(None, "sent")  # type: ignore[arg-type]
        client = self._client()
        if self._adapter.ndjson:
            async with client.stream("POST", request.path, json=request.body, headers=STREAM_HEADERS) as response:
                await self._check_status(response)
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    event = self._adapter.parse(self._json(line))
                    self._apply(request, event)
                    if event.final:
                        break
            return
        async with aconnect_sse(
            client, "POST", request.path, json=request.body, headers={"Connection": "close"}
        ) as source:
            await self._check_status(source.response)
            async for sse in source.aiter_sse():
                data = sse.data
                if data == "[DONE]":
                    break
                if not data.strip():
                    continue
                event = self._adapter.parse(self._json(data))
                self._apply(request, event)
                if event.error is not None or (event.final and request.path == "/completion"):
                    break

    def _json(self, text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            shown = text if len(text) < 200 else text[:199] + "…"
            raise _Failed(RemoteError(self.url, f"the server sent something that is not JSON: {shown!r}")) from None

    async def _check_status(self, response: httpx.Response) -> None:
        if response.status_code == 200:
            return
        body = await response.aread()
        message = error_message(response, body)
        status = response.status_code
        if status == 429 or (status == 503 and self._adapter.busy_503):
            retry = response.headers.get("retry-after", "")
            raise _Busy(message, float(retry) if retry.replace(".", "", 1).isdigit() else None)
        if status in (401, 403):
            hint = "the API key was refused" if self._connection.api_key else "the server wants an API key (api_key_env=)"
            raise _Failed(RemoteError(self.url, f"{message} ({hint})"))
        if status in (400, 413) and _CONTEXT_WORDS.search(message):
            raise _Failed(PromptTooLongError(f"{self.url}: {message}"))
        if status == 404 and self._info.kind == "ollama" and "model" in message.lower():
            raise _Failed(RemoteError(self.url, f"{message} (ollama pull {self._info.model})"))
        raise _Failed(RemoteError(self.url, f"{request_path(response)}: {message}"))

    def _apply(self, request: _Request, event: Event) -> None:
        """(Loop thread.) One stream event into the handle and the books."""
        handle = request.handle
        now = time.perf_counter()
        if event.error is not None:
            if _CONTEXT_WORDS.search(event.error):
                raise _Failed(PromptTooLongError(f"{self.url}: {event.error}"))
            raise _Failed(RemoteError(self.url, f"the server reported: {event.error}"))
        if event.prompt_tokens is not None:
            handle.prompt_tokens = event.prompt_tokens
            request.prompt_known = True
        if event.cached_tokens is not None:
            handle.cached_tokens = event.cached_tokens
        if event.timings is not None:
            handle.server_timings = event.timings
        if event.slot is not None:
            handle.server_slot = event.slot
        if event.finish is not None:
            request.finish = event.finish
        if event.started and not request.started:
            request.started = True
            handle.timing.started = now
            handle._set_running(handle.server_slot if self._adapter.server_slots else request.lane, "prefill")  # type: ignore[arg-type]
        previous = handle.completion_tokens
        tokens = event.tokens if event.tokens is not None else previous + event.new_tokens
        produced = max(0, tokens - previous)
        if produced or event.text:
            if handle.timing.first_token is None:
                handle.timing.first_token = now
                if not request.started:
                    request.started = True
                    if handle.timing.started is None:
                        handle.timing.started = now
            handle._publish(event.text, max(tokens, previous))
            if produced:
                self._meter.add(produced)
                request.rates.append((now, max(tokens, previous)))
        with self._lock:
            self._seq += 1

    def _end(
        self,
        request: _Request,
        reason: FinishReason,
        *,
        error: str | None = None,
        exception: NbollamaError | None = None,
    ) -> None:
        handle = request.handle
        if handle.done():
            return
        row = request.lane
        if self._adapter.server_slots:
            row = handle.server_slot if handle.server_slot is not None else self._slot_of.get(request.id)
        if row is not None and handle.slot != row:
            handle._place(row)
        if self._closing and reason == "cancelled" and error is None:
            error = "the engine was closed"
        result = handle._finish(reason, error=error, exception=exception)
        with self._lock:
            if reason in ("stop", "length"):
                self._totals.completed += 1
            elif reason == "cancelled":
                self._totals.cancelled += 1
            else:
                self._totals.errors += 1
            if request.prompt_known:
                self._totals.prompt_tokens += result.prompt_tokens
            self._totals.generated_tokens += result.completion_tokens
            self._totals.cached_tokens += handle.cached_tokens
            if row is not None:
                self._ended_rows[row] = _Ended(
                    badge={"stop": "done", "length": "done"}.get(reason, reason),
                    request_id=handle.id,
                    preview=request.preview,
                    prompt_tokens=result.prompt_tokens if request.prompt_known else None,
                    cached_tokens=handle.cached_tokens if request.prompt_known else None,
                    decoded=result.completion_tokens,
                    max_tokens=request.max_tokens,
                    at=time.monotonic(),
                )
            self._recent.append(completed_request(result))
            self._seq += 1

    # -- cancelling ----------------------------------------------------------------------

    def _cancel(self, handle: Handle) -> None:
        with self._lock:
            queued = self._queued.pop(handle.id, None)
            if queued is not None:
                self._totals.cancelled += 1
                self._seq += 1
            request = self._inflight.get(handle.id)
        if queued is not None:
            handle._finish("cancelled", error="the engine was closed" if self._closing else None)
            return
        if request is not None:
            request.cancel_requested = True
            self._call_in_loop(self._cancel_task, request)

    @staticmethod
    def _cancel_task(request: _Request) -> None:
        if request.task is not None and not request.task.done():
            request.task.cancel()  # closes the stream: the server stops the request

    def cancel_slot(self, slot: int) -> int | None:
        """Cancel this kernel's request shown on row ``slot``; its id, or None if the row was idle.

        On a llama-server the rows are the server's slots: a slot serving
        another client's request raises ``ValueError`` (nbollama cancels only
        this kernel's requests).
        """
        rows = self.parallel
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < rows:
            raise ValueError(f"slot {slot!r} does not exist (this engine has slots 0..{rows - 1})")
        if self._rows_are_server_slots():
            if not self._poller.active and time.monotonic() - self._last_poll > _STALE_STATE:
                self._refresh_state()
            with self._lock:
                request = next(
                    (self._inflight[r] for r, s in self._slot_of.items() if s == slot and r in self._inflight),
                    None,
                )
                state = self._state
            if request is None:
                busy = state is not None and state.slots is not None and any(s.id == slot and s.processing for s in state.slots)
                if busy:
                    raise ValueError(
                        f"slot {slot} is serving another client's request; nbollama cancels only this kernel's requests"
                    )
                return None
        else:
            with self._lock:
                request = self._lanes[slot] if slot < len(self._lanes) else None
            if request is None:
                return None
        request.handle.cancel()
        return request.id

    def cancel_all(self) -> int:
        """Cancel every queued and running request of this kernel; how many were cancelled."""
        with self._lock:
            requests = list(self._queued.values()) + list(self._inflight.values())
        return sum(1 for r in requests if r.handle.cancel())

    # -- the server's state ----------------------------------------------------------------

    def _rows_are_server_slots(self) -> bool:
        if not self._adapter.server_slots or not self._info.slots_endpoint:
            return False
        state = self._state
        return state is None or state.slots is not None

    def _poll_server(self) -> ServerState:
        with self._poll_lock:  # one poll at a time, whoever asks
            return self._adapter.poll(self._poll_client)

    def _refresh_state(self, *, wait: bool = False) -> None:
        """Poll now, on the caller's thread (nothing polls in the background, or nothing was seen yet).

        Without ``wait`` a poll already under way (the poller's) is not waited for.
        """
        if self._closed or (not wait and self._poll_lock.locked()):
            return
        if time.monotonic() - self._last_poll < 0.5 and (self._state is not None or self._state_error is not None):
            return
        state, error = self._poller.poll_once()
        self._take_state(state, error)

    def _take_state(self, state: ServerState | None, error: str | None) -> None:
        """A poll's outcome (poller thread, or a caller's): keep it and match our requests to slots."""
        with self._lock:
            self._last_poll = time.monotonic()
            if state is None:
                if self._state_error != error:
                    self._state_error = error
                    self._seq += 1
                return
            previous = self._state
            self._state = state
            self._state_error = None
            self._measure(previous, state)
            if state.slots is not None:
                self._match_slots(state.slots)
            key = (
                tuple((s.id, s.processing, s.task, s.decoded, s.prompt_processed) for s in state.slots or ()),
                state.running,
                state.waiting,
                state.kv_usage,
                tuple((m["name"], m["size"], m["size_vram"], m["expires_at"]) for m in state.models),
                state.slots_note,
            )
            if key != self._state_key:
                self._state_key = key
                self._seq += 1
        self._monitor.wake()

    def _measure(self, previous: ServerState | None, state: ServerState) -> None:
        """Rates from two polls: each slot's tokens/s (any client) and the server's throughput."""
        if state.slots is not None:
            marks: dict[int, tuple[int | None, int, float]] = {}
            rates: dict[int, float] = {}
            generated = 0
            span = None
            for slot in state.slots:
                if not slot.processing:
                    continue
                marks[slot.id] = (slot.task, slot.decoded, state.mono)
                before = self._slot_marks.get(slot.id)
                if before is not None and before[0] == slot.task and state.mono > before[2]:
                    dt = state.mono - before[2]
                    rates[slot.id] = round(max(0, slot.decoded - before[1]) / dt, 2)
                    generated += max(0, slot.decoded - before[1])
                    span = dt
            self._slot_marks, self._slot_rates = marks, rates
            if previous is not None and previous.slots is not None:
                dt = state.mono - previous.mono
                self._server_throughput = round(generated / (span or dt), 2) if (span or dt) > 0 else None
        elif state.generated_total is not None and previous is not None and previous.generated_total is not None:
            dt = state.mono - previous.mono
            if dt > 0:
                self._server_throughput = round(max(0.0, state.generated_total - previous.generated_total) / dt, 2)

    def _match_slots(self, slots: list[ServerSlot]) -> None:
        """Which server slot serves which of our requests (llama-server tells only at the end).

        A request of ours fits a busy slot when the slot's ``n_predict`` is its
        ``max_tokens``; among fits, the closest decoded count (then prompt
        length) wins, and a match sticks while it fits. Requests sent but not
        yet started take the slots still reading a prompt.
        """
        busy = {s.id: s for s in slots if s.processing}
        sent = [r for r in self._inflight.values() if r.handle.sent_at is not None]
        ours = [r for r in sent if r.started or r.handle.completion_tokens > 0]
        waiting = sorted((r for r in sent if r not in ours), key=lambda r: r.handle.sent_at or 0.0)
        taken: set[int] = set()
        matched: dict[int, int] = {}

        def fits(request: _Request, slot: ServerSlot) -> bool:
            return slot.max_tokens is None or slot.max_tokens == request.max_tokens

        def cost(request: _Request, slot: ServerSlot) -> int:
            # /slots' prompt counts move while a prompt is read (and differ between builds):
            # they break ties, the decoded count leads
            known = request.handle.prompt_tokens if request.prompt_known else None
            differs = known is not None and slot.prompt_tokens is not None and slot.prompt_tokens != known
            return abs(slot.decoded - request.handle.completion_tokens) + (3 if differs else 0)

        for request in ours:
            sid = request.handle.server_slot if request.handle.server_slot is not None else self._slot_of.get(request.id)
            slot = busy.get(sid) if sid is not None else None
            if slot is not None and sid not in taken and fits(request, slot):
                matched[request.id] = slot.id
                taken.add(slot.id)
        pairs = sorted(
            (cost(r, slot), r.order, r.id, slot.id)
            for r in ours
            if r.id not in matched
            for slot in busy.values()
            if slot.id not in taken and fits(r, slot)
        )
        for _, _, rid, sid in pairs:
            if rid in matched or sid in taken:
                continue
            matched[rid] = sid
            taken.add(sid)
        # Sent, but the server has not said it started (its first progress event may not have
        # come yet): a slot still reading a prompt, with our max_tokens, is most likely ours.
        for request in waiting:
            sid = self._slot_of.get(request.id)
            candidates = ([busy[sid]] if sid in busy else []) + sorted(busy.values(), key=lambda s: s.id)
            slot = next(
                (s for s in candidates if s.id not in taken and s.decoded == 0 and fits(request, s)), None
            )
            if slot is not None:
                matched[request.id] = slot.id
                taken.add(slot.id)
        self._slot_of = matched
        for rid, sid in matched.items():
            request = self._inflight.get(rid)
            if request is not None:
                request.handle._place(sid)

    # -- looking at it --------------------------------------------------------------------

    def subscribe(self, callback: Callable[[EngineSnapshot], object], *, interval: float = 0.25) -> Subscription:
        """Call ``callback(snapshot)`` from a background thread when something changed (4 Hz at most).

        While anything is subscribed, the server's state is polled at 2 Hz at most.
        """
        return self._monitor.subscribe(callback, interval)

    def _change_key(self) -> Hashable:
        now = time.monotonic()
        badges = sum(1 for e in self._ended_rows.values() if now - e.at < _BADGE_SECONDS)
        return (self._seq, round(self._meter.rate(), 1), badges, self._closed)

    def snapshot(self) -> EngineSnapshot:
        """The shared snapshot shape; figures the server does not give are None (unknown)."""
        if not self._closed:
            if self._state is None and self._state_error is None:
                self._refresh_state(wait=True)  # the first look: whoever asks waits for it
            elif not self._poller.active and time.monotonic() - self._last_poll > _STALE_STATE:
                self._refresh_state()
        now_mono = time.monotonic()
        now_perf = time.perf_counter()
        with self._lock:
            state = self._state
            server_rows = self._rows_are_server_slots()
            slots = self._server_rows(state, now_mono, now_perf) if server_rows else self._lane_rows(now_mono, now_perf)
            totals = self._totals.as_dict()
            seq = self._seq
            recent = list(self._recent)[-16:]
            queue_length = len(self._queued)
            in_flight = len(self._inflight)
            error = self._state_error
            server_throughput = self._server_throughput
        info = self._info
        ctx = info.ctx
        models = list(state.models) if state is not None else []
        if info.kind == "ollama":
            entry = next((m for m in models if m["name"] in (info.model, f"{info.model}:latest")), None)
            if entry is not None and entry["context_length"] is not None:
                ctx = entry["context_length"]
        kv_total: int | None = None
        kv_used: int | None = None
        if info.kind == "llama-server" and info.parallel is not None and ctx is not None:
            kv_total = info.parallel * ctx
        elif state is not None and state.kv_total is not None:
            kv_total = state.kv_total
            if state.kv_usage is not None:
                kv_used = round(state.kv_usage * state.kv_total)
        prompt_total = totals["prompt_tokens"]
        hit_rate = None
        if state is not None and state.prefix_queries:
            hit_rate = round((state.prefix_hits or 0.0) / state.prefix_queries, 4)
        ttft = None
        if state is not None and state.ttft_count:
            ttft = round((state.ttft_sum or 0.0) / state.ttft_count, 4)
        remote = RemoteFigures(
            server_parallel=info.parallel,
            parallel_source=info.parallel_source,
            rows="server slots" if server_rows else "requests in flight",
            max_inflight=self._max_inflight,
            in_flight=in_flight,
            waiting=queue_length,
            server_running=state.running if state is not None else None,
            server_waiting=state.waiting if state is not None else None,
            server_throughput=server_throughput,
            kv_usage=state.kv_usage if state is not None else None,
            prefix_cache_hit_rate=hit_rate,
            server_ttft=ttft,
            models=models,
            metrics=bool(state is not None and state.metrics),
            host_is_local=info.host_is_local,
            version=info.version,
            reachable=error is None,
            error=error,
            polled_at=state.wall if state is not None else None,
        )
        return EngineSnapshot(
            v=SNAPSHOT_VERSION,
            time=time.time(),
            seq=seq,
            closed=self._closed,
            kind=info.kind,  # type: ignore[typeddict-item]
            endpoint=self.url,
            model={
                "name": info.model,
                "path": info.model_path,
                "arch": info.model_family,
                "size_bytes": info.model_size,
                "n_params": info.model_params,
            },
            parallel=len(slots),
            parallel_max=len(slots),
            reproducible=False,
            ctx_per_slot=ctx,
            n_batch=None,
            gpu_layers=None,
            parallel_reason=self._parallel_reason(server_rows, state),
            slots=slots,
            queue={"length": queue_length, "max": self._max_queue},
            throughput=round(self._meter.rate(), 2),
            throughput_window=self._meter.window,
            busy_slots=sum(1 for s in slots if s["state"] != "idle"),
            kv={"used": kv_used, "total": kv_total, "bytes": None},
            memory=self._memory(),
            totals=totals,  # type: ignore[typeddict-item]
            recent=recent,
            prefix_cache={
                "enabled": info.prefix_cache,
                "hit_rate": round(totals["cached_tokens"] / prompt_total, 4) if prompt_total else 0.0,
                "shared_prefills": None,
            },
            adaptive=None,
            remote=remote,
        )

    def _parallel_reason(self, server_rows: bool, state: ServerState | None) -> str:
        info = self._info
        if server_rows:
            return (
                f"the server's slots ({info.describe_parallel()}); this kernel sends at most "
                f"{self._max_inflight} at once ({self._inflight_reason})"
            )
        note = f"; {state.slots_note}" if state is not None and state.slots_note else ""
        return (
            f"rows are this kernel's requests in flight, at most {self._max_inflight} "
            f"({self._inflight_reason}); server parallel: {info.describe_parallel()}{note}"
        )

    def _memory(self) -> MemoryFigures:
        gpus = _memory.gpu_figures() if self._info.host_is_local else []
        if self._info.host_is_local:
            note = (
                "the server runs on this machine: the GPU figures are this machine's (NVML), the server's use included"
                if gpus
                else "the server runs on this machine, which has no GPU NVML can see; its memory is not measured from here"
            )
        else:
            note = "the server's memory is not visible from this kernel" + (
                " (Ollama's /api/ps gives its models' size)" if self._info.kind == "ollama" else ""
            )
        return MemoryFigures(
            source="remote",
            process_rss=None,
            process_pss=None,
            host_total=None,
            host_available=None,
            gpus=gpus,
            kv_bytes=None,
            kv_estimate="",
            note=note,
        )

    def _tps(self, request: _Request, now_perf: float) -> float | None:
        first = request.handle.timing.first_token
        if first is None:
            return None
        elapsed = now_perf - first
        n = request.handle.completion_tokens
        return round(n / elapsed, 2) if elapsed > 0.05 and n else 0.0

    def _idle_row(self, row: int, now_mono: float) -> SlotSnapshot:
        ended = self._ended_rows.get(row)
        if ended is None:
            return SlotSnapshot(
                id=row, state="idle", badge="idle", request_id=None, prompt_preview="",
                prompt_tokens=None, prefilled_tokens=None, cached_tokens=None, decoded_tokens=0,
                max_tokens=None, tps=None, kv_used=None, origin="this kernel",
            )
        recent = now_mono - ended.at < _BADGE_SECONDS
        return SlotSnapshot(
            id=row,
            state="idle",
            badge=ended.badge if recent else "idle",  # type: ignore[typeddict-item]
            request_id=ended.request_id,
            prompt_preview=ended.preview,
            prompt_tokens=ended.prompt_tokens,
            prefilled_tokens=ended.prompt_tokens,
            cached_tokens=ended.cached_tokens,
            decoded_tokens=ended.decoded,
            max_tokens=ended.max_tokens,
            tps=None,
            kv_used=None,
            origin="this kernel",
        )

    def _lane_rows(self, now_mono: float, now_perf: float) -> list[SlotSnapshot]:
        rows: list[SlotSnapshot] = []
        for lane in range(max(self._max_inflight, len(self._lanes))):
            request = self._lanes[lane] if lane < len(self._lanes) else None
            if request is None:
                rows.append(self._idle_row(lane, now_mono))
                continue
            handle = request.handle
            generating = handle.completion_tokens > 0 or handle.timing.first_token is not None
            known = handle.prompt_tokens if request.prompt_known else None
            rows.append(
                SlotSnapshot(
                    id=lane,
                    state="generating" if generating else "sent",
                    badge="generating" if generating else "sent",
                    request_id=handle.id,
                    prompt_preview=request.preview,
                    prompt_tokens=known,
                    prefilled_tokens=known if generating else None,
                    cached_tokens=handle.cached_tokens if request.prompt_known else None,
                    decoded_tokens=handle.completion_tokens,
                    max_tokens=request.max_tokens,
                    tps=self._tps(request, now_perf),
                    kv_used=None,
                    origin="this kernel",
                )
            )
        return rows

    def _server_rows(self, state: ServerState | None, now_mono: float, now_perf: float) -> list[SlotSnapshot]:
        if state is None or state.slots is None:
            return []
        by_slot = {sid: self._inflight.get(rid) for rid, sid in self._slot_of.items()}
        rows: list[SlotSnapshot] = []
        for slot in state.slots:
            request = by_slot.get(slot.id)
            if request is None and slot.processing:
                ended = self._ended_rows.get(slot.id)
                if ended is not None and ended.at >= state.mono:
                    # our request there ended after this poll began: the slot is ours, and done
                    rows.append(self._idle_row(slot.id, now_mono))
                    continue
            if not slot.processing and request is None:
                rows.append(self._idle_row(slot.id, now_mono))
                continue
            prefilled = None
            if slot.prompt_processed is not None:
                prefilled = slot.prompt_processed + (slot.prompt_cached or 0)
            decoded = slot.decoded
            if request is not None:
                decoded = max(decoded, request.handle.completion_tokens)
            generating = decoded > 0  # a slot decodes only once its prompt is read
            state_name = "generating" if generating else "prefill"
            kv_used = None
            if prefilled is not None:
                kv_used = prefilled + decoded
            if request is not None:
                rows.append(
                    SlotSnapshot(
                        id=slot.id,
                        state=state_name,  # type: ignore[typeddict-item]
                        badge=state_name,  # type: ignore[typeddict-item]
                        request_id=request.id,
                        prompt_preview=request.preview,
                        prompt_tokens=slot.prompt_tokens,
                        prefilled_tokens=prefilled,
                        cached_tokens=slot.prompt_cached,
                        decoded_tokens=decoded,
                        max_tokens=request.max_tokens,
                        tps=self._tps(request, now_perf),
                        kv_used=kv_used,
                        origin="this kernel",
                    )
                )
            else:
                rows.append(
                    SlotSnapshot(
                        id=slot.id,
                        state=state_name,  # type: ignore[typeddict-item]
                        badge=state_name,  # type: ignore[typeddict-item]
                        request_id=None,
                        prompt_preview="",
                        prompt_tokens=slot.prompt_tokens,
                        prefilled_tokens=prefilled,
                        cached_tokens=slot.prompt_cached,
                        decoded_tokens=decoded,
                        max_tokens=slot.max_tokens,
                        tps=self._slot_rates.get(slot.id),
                        kv_used=kv_used,
                        origin="another client",
                    )
                )
        return rows

    # -- closing -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing or self._closed:
            raise EngineClosedError(
                f"this connection to {self.url} was closed; connect again (nbollama.connect or %nbollama connect)"
            )

    def close(self) -> None:
        """Cancel this kernel's requests (their streams close, so the server frees their slots),
        stop the threads and close the connections. The server keeps running. Idempotent."""
        if threading.current_thread() is self._thread:
            raise EngineError("close() cannot be called from the engine's own thread (a done-callback)")
        with self._lock:
            first = not self._closing
            self._closing = True
            queued = list(self._queued.values())
            self._queued.clear()
            self._queue.clear()
            inflight = list(self._inflight.values())
            self._seq += 1
        if not first:
            self._close_done.wait(10)
            return
        try:
            for request in queued:
                if request.handle._finish("cancelled", error="the engine was closed") is not None:
                    with self._lock:
                        self._totals.cancelled += 1
            for request in inflight:
                request.cancel_requested = True
                self._call_in_loop(self._cancel_task, request)
            deadline = time.monotonic() + 10
            for request in inflight:
                with contextlib.suppress(TimeoutError):
                    request.handle.result(timeout=max(0.1, deadline - time.monotonic()))
            self._poller.stop()
            if self._loop.is_running():
                future = asyncio.run_coroutine_threadsafe(self._close_client(), self._loop)
                with contextlib.suppress(Exception):
                    future.result(timeout=5)
                self._call_in_loop(self._loop.stop)
            self._thread.join(timeout=10)
            with self._lock:
                self._closed = True
                self._seq += 1
            self._monitor.stop()
        finally:
            self._closed = True
            with contextlib.suppress(Exception):
                self._poll_client.close()
            _live_engines.discard(self)
            self._close_done.set()

    async def _close_client(self) -> None:
        client, self._aclient = self._aclient, None
        if client is not None:
            await client.aclose()


def request_path(response: httpx.Response) -> str:
    return f"{response.request.method} {response.request.url.path}"
