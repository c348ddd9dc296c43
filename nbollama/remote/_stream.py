"""A remote engine's event-loop side: sending requests, reading their streams, ending them.

Runs on the engine's event-loop thread (``nbollama-remote-N``): at most
``max_inflight`` requests are open at once through one ``httpx.AsyncClient``;
a "server busy" answer is retried with doubling waits; cancelling a sent
request closes its stream, which is how every one of these servers is told to
stop. Whatever happens, a request ends in ``_end`` with its ``Result``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from .._api.base import EngineBase
from .._api.queue import WaitingQueue
from .._api.requests import FinishReason, Handle
from .._api.snapshot import EndedRequest, completed_request
from .._logging import logger
from ..exceptions import NbollamaError, PromptTooLongError, QueueFullError, RemoteError
from ._adapters import Adapter, Event, ServerState
from ._detect import ServerInfo
from ._http import STREAM_HEADERS, Connection, error_message
from ._outputs import OutputBooks
from ._poller import StatePoller

__all__ = ["RemoteHandle", "RemoteStreams", "BUSY_RETRIES", "BUSY_FIRST_WAIT"]

#: Tries after a "server busy" answer (HTTP 503 from Ollama, 429 from any), with doubling waits.
BUSY_RETRIES = 5
BUSY_FIRST_WAIT = 0.25
_CONTEXT_WORDS = re.compile(r"context (size|length|window)|exceed_context|too long|maximum context", re.IGNORECASE)


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
    books: OutputBooks | None = None  # logprobs and a format, when the request asked

    @property
    def id(self) -> int:
        return self.handle.id


class _Busy(Exception):
    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Failed(Exception):
    def __init__(self, error: NbollamaError) -> None:
        super().__init__(str(error))
        self.error = error


class RemoteStreams(EngineBase[_Request]):
    """The event-loop part of ``RemoteEngine``, and the state every part of it shares
    (``RemoteEngine.__init__`` sets it)."""

    _connection: Connection
    _info: ServerInfo
    _adapter: Adapter
    _loop: asyncio.AbstractEventLoop
    _aclient: httpx.AsyncClient | None
    _max_inflight: int
    _queue: WaitingQueue[_Request]
    _queued: dict[int, _Request]
    _inflight: dict[int, _Request]
    _lanes: list[_Request | None]
    _ended_rows: dict[int, EndedRequest]
    _slot_of: dict[int, int]
    _inflight_reason: str
    _state: ServerState | None
    _state_error: str | None
    _state_key: Hashable
    _slot_rates: dict[int, float]
    _slot_marks: dict[int, tuple[int | None, int, float]]
    _server_throughput: float | None
    _poll_client: httpx.Client
    _poll_lock: threading.Lock
    _last_poll: float
    _poller: StatePoller

    @property
    def url(self) -> str:
        """The server's URL, credentials redacted."""
        return self._connection.url

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
            while len(self._inflight) < self._max_inflight and not self._closing:
                request = self._queue.pop()
                if request is None:
                    break
                self._queued.pop(request.id, None)
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
            error = RemoteError(self.url, self._connection.scrub(f"{type(exc).__name__}: {exc}"))
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
            handle._set_running(request.lane, "sent")
        else:
            handle._set_running(None, "sent")
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
        message = self._connection.scrub(error_message(response, body))
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
        if request.books is not None:
            event.text = request.books.take(event.text, event.logprobs)
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
            handle._set_running(
                handle.server_slot if self._adapter.server_slots else request.lane, "prefill"
            )
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
        outputs = (
            request.books.outputs(
                reason,
                prompt_tokens=handle.prompt_tokens if request.prompt_known else None,
                completion_tokens=handle.completion_tokens,
                max_tokens=request.max_tokens,
            )
            if request.books is not None
            else {}
        )
        result = handle._finish(reason, error=error, exception=exception, **outputs)
        with self._lock:
            self._totals.ended(reason)
            if request.prompt_known:
                self._totals.prompt_tokens += result.prompt_tokens
            self._totals.generated_tokens += result.completion_tokens
            self._totals.cached_tokens += handle.cached_tokens
            if row is not None:
                self._ended_rows[row] = EndedRequest.of(
                    reason, result, request.preview, request.max_tokens, known=request.prompt_known
                )
            self._recent.append(completed_request(result))
            self._seq += 1

    @staticmethod
    def _cancel_task(request: _Request) -> None:
        if request.task is not None and not request.task.done():
            request.task.cancel()  # closes the stream: the server stops the request

    async def _close_client(self) -> None:
        client, self._aclient = self._aclient, None
        if client is not None:
            await client.aclose()


def request_path(response: httpx.Response) -> str:
    return f"{response.request.method} {response.request.url.path}"
