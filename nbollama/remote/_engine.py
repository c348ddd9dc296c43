"""A remote engine: llama-server, Ollama, vLLM or an OpenAI-compatible server behind the engine protocol.

It implements ``EngineLike`` and hands out real ``Handle``/``Result`` objects,
so ``%%generate``, ``nbollama.generate``, the dashboard, the side panel,
``%nbollama status`` and ``bench`` work on it unchanged. What both engines do
alike comes from ``EngineBase``; this module adds the remote parts, in halves:
``_stream`` (the event loop: send, stream, end), ``_state`` (the server's
polled state) and ``_rows`` (the snapshot).

Threads and who owns what:

* the caller's thread checks parameters and queues (``submit_many``), or cancels;
* the engine's event-loop thread (``nbollama-remote-N``) sends at most
  ``max_inflight`` requests at once and reads their streams; the rest wait in
  nbollama's own queue (highest priority first, FIFO within one), so a
  200-prompt cell does not open 200 connections;
* a poller thread (``nbollama-remote-poll-N``) reads the server's state at
  2 Hz at most, only while a view is subscribed;
* the monitor thread turns changes into snapshots.

``_lock`` guards the queue, the lanes and the books; nothing blocking is done
under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections.abc import Hashable, Sequence
from typing import Any, cast

import httpx

from .._api.base import check_slot, preview_of
from .._api.queue import WaitingQueue, resolve_max_queue, whole_number
from .._api.requests import Handle, SamplingParams
from .._api.snapshot import EndedRequest
from ..exceptions import InvalidParamsError
from ._adapters import Adapter, ServerState, adapter_for
from ._detect import ServerInfo
from ._http import Connection
from ._outputs import OUTPUT_PARAMS, OutputBooks
from ._poller import StatePoller, WatchedMonitor
from ._rows import STALE_STATE, RemoteRows
from ._stream import BUSY_RETRIES, RemoteHandle, _Request

__all__ = ["RemoteEngine", "RemoteHandle", "DEFAULT_MAX_INFLIGHT", "BUSY_RETRIES"]

#: Requests in flight when the server does not say how many it runs at once.
DEFAULT_MAX_INFLIGHT = 4
_REQUEST_FIELDS = frozenset({"priority", "chat", "system", "cache"})  # not sent: nbollama's own


class RemoteEngine(RemoteRows):
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
        if max_inflight is not None:
            whole_number("max_inflight", max_inflight, 1, "must be a whole number >= 1")
        super().__init__()
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
        self._connect_seconds = connect_seconds
        self._queue: WaitingQueue[_Request] = WaitingQueue(
            resolve_max_queue(max_queue), name=f"nbollama's queue for {connection.url}"
        )
        self._queued: dict[int, _Request] = {}
        self._inflight: dict[int, _Request] = {}
        self._lanes: list[_Request | None] = [None] * self._max_inflight
        self._ended_rows: dict[int, EndedRequest] = {}  # row -> how its last request of ours ended
        self._order = itertools.count()
        self._closing_queued: list[_Request] = []
        self._closing_inflight: list[_Request] = []
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
        self._track()

    @property
    def info(self) -> ServerInfo:
        """What detection found: the kind, the model, the server's parallel and context."""
        return self._info

    @property
    def kind(self) -> str:
        """``llama-server``, ``ollama``, ``vllm`` or ``openai``."""
        return self._info.kind

    @property
    def model_name(self) -> str:
        """The model, as the server names it."""
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
        """Requests this kernel has at the server at once; the rest wait in its queue."""
        return self._max_inflight

    @property
    def max_inflight_reason(self) -> str:
        """Why ``max_inflight`` is what it is."""
        return self._inflight_reason

    @property
    def ctx(self) -> int | None:
        """Context per slot (llama-server) or the model's, when the server says; else None."""
        return self._info.ctx

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

    def set_max_inflight(self, n: int, *, reason: str | None = None) -> None:
        """Change how many requests go to the server at once (the sweep tries several)."""
        whole_number("max_inflight", n, 1, "must be a whole number >= 1")
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

    def _prepare(
        self, prompt: str, sampling: SamplingParams, options: dict[str, Any], checked: object
    ) -> _Request:
        handle = RemoteHandle(self._next_request_id(), prompt, 0, sampling.max_tokens, self._cancel)
        handle.model = self.name or self.model_name
        given = cast("set[str]", checked)  # what _check_params returned
        output = options["output"]
        path, body = self._adapter.build(
            prompt, sampling, given, chat=bool(options["chat"]), system=options["system"], output=output
        )
        request = _Request(
            handle=handle,
            path=path,
            body=body,
            priority=int(options["priority"]),
            preview=preview_of(prompt),
            max_tokens=sampling.max_tokens,
            order=next(self._order),
            books=OutputBooks.wanted(sampling, output, body, prompt),
        )
        if not prompt.strip() and not options["chat"]:
            self._fail_empty(handle)
        return request

    def _cancel(self, handle: Handle) -> None:
        with self._lock:
            queued = self._queued.pop(handle.id, None)
            if queued is not None:
                self._queue.remove(queued)
                self._totals.cancelled += 1
                self._seq += 1
            request = self._inflight.get(handle.id)
        if queued is not None:
            handle._finish("cancelled", error="the engine was closed" if self._closing else None)
            return
        if request is not None:
            request.cancel_requested = True
            self._call_in_loop(self._cancel_task, request)

    def cancel_slot(self, slot: int) -> int | None:
        """Cancel this kernel's request shown on row ``slot``; its id, or None if the row was idle.

        On a llama-server the rows are the server's slots: a slot serving
        another client's request raises ``InvalidParamsError`` (a ``ValueError``) (nbollama cancels only
        this kernel's requests).
        """
        check_slot(slot, self.parallel)
        if self._rows_are_server_slots():
            if not self._poller.active and time.monotonic() - self._last_poll > STALE_STATE:
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
                    raise InvalidParamsError(
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

    # -- submitting (``EngineBase.submit_many`` calls these) ------------------------------

    def _check_params(self, params: dict[str, Any]) -> set[str]:
        """Every sampling parameter given is sent; one this kind of server has no word for raises,
        and so do logprobs, choices or a format it cannot give (nothing is sent either way)."""
        given = set(params) - _REQUEST_FIELDS - OUTPUT_PARAMS
        self._adapter.check(given)
        self._adapter.check_outputs(params)
        return given

    def _store_identity(self) -> str | None:
        """The server's model (Ollama's digest, llama-server's model file, vLLM's model) and its URL
        without credentials: the result store's key for what this server answers."""
        info = self._info
        return json.dumps(
            {
                "kind": info.kind,
                "url": info.url,
                "model": info.model,
                "model_path": info.model_path,
                "model_size": info.model_size,
                "model_digest": info.model_digest,
                "version": info.version,
            },
            sort_keys=True,
        )

    def _store_material(self, request: _Request) -> bytes:
        """What the server is sent (the path and body: prompt or messages, system, every field)."""
        return json.dumps([request.path, request.body], sort_keys=True, default=str).encode()

    def _store_label(self) -> str:
        return f"{self._info.model} ({self._info.kind})"

    def _enqueue(self, requests: Sequence[_Request]) -> None:
        self._queue.push_all([(r, r.priority) for r in requests])
        for request in requests:
            self._queued[request.id] = request

    def _after_submit(self) -> None:
        self._call_in_loop(self._pump)

    def _live_handles(self) -> list[Handle]:
        return [r.handle for r in (*self._queued.values(), *self._inflight.values())]

    def _window_rows(self) -> int:
        return self._max_inflight

    def _queue_limit(self) -> int:
        return self._queue.max_size

    # -- looking at it --------------------------------------------------------------------

    def subscribe(self, callback: Any, *, interval: float = 0.25) -> Any:
        """Call ``callback(snapshot)`` from a background thread when something changed (4 Hz at most).

        While anything is subscribed, the server's state is polled at 2 Hz at most.
        """
        return super().subscribe(callback, interval=interval)

    def _badges_showing(self, now: float) -> int:
        return sum(1 for e in self._ended_rows.values() if e.showing(now))

    # -- closing -------------------------------------------------------------------------

    def _closed_message(self) -> str:
        return f"this connection to {self.url} was closed; connect again (nbollama.connect or %nbollama connect)"

    def _begin_close(self) -> None:
        self._closing_queued = list(self._queued.values())
        self._queued.clear()
        self._queue.drain()
        self._closing_inflight = list(self._inflight.values())

    def _stop(self) -> None:
        """Cancel this kernel's requests (their streams close, so the server frees their slots)
        and stop the threads. The server keeps running."""
        for request in self._closing_queued:
            if request.handle._finish("cancelled", error="the engine was closed") is not None:
                with self._lock:
                    self._totals.cancelled += 1
        for request in self._closing_inflight:
            request.cancel_requested = True
            self._call_in_loop(self._cancel_task, request)
        deadline = time.monotonic() + 10
        for request in self._closing_inflight:
            with contextlib.suppress(TimeoutError):
                request.handle.result(timeout=max(0.1, deadline - time.monotonic()))
        self._poller.stop()
        if self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._close_client(), self._loop)
            with contextlib.suppress(Exception):
                future.result(timeout=5)
            self._call_in_loop(self._loop.stop)
        self._thread.join(timeout=10)

    def _release(self) -> None:
        with contextlib.suppress(Exception):
            self._poll_client.close()
