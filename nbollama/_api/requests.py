"""Requests as the caller sees them: parameters in, a ``Handle`` to stream or wait on, a ``Result`` out.

A handle is written by the engine's thread and read from anywhere: plain
threads (``result()``, ``for delta in handle``) and event loops under anyio,
asyncio or trio (``await handle``, ``handle.astream()``). Event-loop waiters
are woken without ever blocking the engine's thread on the loop.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.lowlevel

from ..exceptions import (
    NbollamaError,
    RequestFailedError,
    RequestTimeoutError,
)
from .cards import card_html, final_view, short
from .outputs import (
    TokenLogprob,
    mean_logprob,
)
from .params import SamplingParams, check_request_params

__all__ = [
    "check_request_params",
    "FinishReason",
    "RequestStatus",
    "SamplingParams",
    "Result",
    "Handle",
]

FinishReason = Literal["stop", "length", "cancelled", "error"]
#: "sent": a remote engine sent the request to a server that shows no slots, and no token came yet
RequestStatus = Literal["queued", "sent", "prefill", "generating", "done", "cancelled", "error"]

_FINAL_STATUS: dict[str, RequestStatus] = {
    "stop": "done",
    "length": "done",
    "cancelled": "cancelled",
    "error": "error",
}


@dataclass(frozen=True)
class Result:
    """A finished request: its text, why it stopped, and how long each part took (seconds)."""

    id: int
    prompt: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    error: str | None
    ttft: float | None  # submit -> first token (queue wait and prefill included)
    tpot: float | None  # mean time per output token after the first
    queue_wait: float  # submit -> a slot took it
    total_time: float  # submit -> finished
    slot: int | None
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache instead of prefilled
    token_ids: tuple[
        int, ...
    ] = ()  # the generated tokens (to compare runs exactly); () from a remote engine
    #: A remote server's own timings of this request, where it gives them (llama-server's
    #: ``timings``, Ollama's durations): ``prompt_ms``, ``predicted_ms``, ``predicted_per_second``...
    server_timings: Mapping[str, float] | None = field(default=None, compare=False)
    #: with ``logprobs=K``: each generated token as the model computed it, in OpenAI's shape
    logprobs: tuple[TokenLogprob, ...] | None = field(default=None, compare=False)
    #: with ``prompt_logprobs=True``: the same for the prompt's tokens (None for the first token)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = field(default=None, compare=False)
    #: with ``choices=``: the most likely option, and each option's probability over the options
    choice: str | None = None
    choice_probs: Mapping[str, float] | None = field(default=None, compare=False)
    #: with ``json_schema=``/``regex=``/``grammar=``: the output parsed (a dict, or a model instance)
    parsed: Any = field(default=None, compare=False)
    #: why ``parsed`` is None although a format was asked for (cut short by max_tokens, invalid...)
    parse_error: str | None = None
    #: the engine that answered: its name in the kernel ("default", ``--as NAME``), else its model's name
    model: str = ""
    #: replayed from the result store (``nbollama.store``) instead of generated; timings are the original run's
    cached: bool = False
    #: with ``choices=``: each option's summed log-probability after the prompt (its log-likelihood)
    choice_logprobs: Mapping[str, float] | None = field(default=None, compare=False)
    #: with ``choices=`` and ``logprobs>=1``: whether every token of each option was the most likely one
    choice_greedy: Mapping[str, bool] | None = field(default=None, compare=False)
    #: of ``completion_tokens``, those a format forced and the engine took without sampling (jump-forward)
    forced_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.finish_reason in ("stop", "length")

    def __repr__(self) -> str:
        """One line: the id, how it ended, its tokens and the start of its text."""
        ended = f"{self.finish_reason}, replayed" if self.cached else self.finish_reason
        n = self.completion_tokens
        return f"<Result #{self.id} {ended}, {n} token{'' if n == 1 else 's'}: {short(self.text, 60)!r}>"

    def _repr_html_(self) -> str:
        """In a notebook, the card a ``%%generate`` cell draws for it (tokens shaded when logprobs were asked)."""
        return card_html(final_view(self.id, self))

    def show(self) -> None:
        """Display the card: with ``logprobs=K``, the tokens shaded by probability, alternatives on hover."""
        from IPython.display import HTML, display

        hint = "" if self.logprobs or self.prompt_logprobs else (
            "<i>no log-probabilities here: ask with <code>logprobs=5</code> to see the tokens</i>"
        )
        display(HTML(self._repr_html_() + hint))  # type: ignore[no-untyped-call]

    @property
    def mean_logprob(self) -> float | None:
        """Mean log-probability of the generated tokens (needs ``logprobs``)."""
        return mean_logprob(self.logprobs)

    @property
    def perplexity(self) -> float | None:
        """exp(-mean log-probability) of the generated tokens: 1 is certain (needs ``logprobs``)."""
        mean = self.mean_logprob
        return math.exp(-mean) if mean is not None else None

    @property
    def prompt_perplexity(self) -> float | None:
        """The prompt's perplexity under the model (needs ``prompt_logprobs=True``)."""
        scored = [t for t in self.prompt_logprobs or () if t is not None]
        mean = mean_logprob(scored)
        return math.exp(-mean) if mean is not None else None

    @property
    def gen_tps(self) -> float | None:
        """Generated tokens per second after the first token (this request's own speed)."""
        if self.tpot:
            return 1.0 / self.tpot
        return None


@dataclass
class _Timing:
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None


class _LoopWaker:
    """Wakes one task in an event loop from the engine's thread, never blocking that thread."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        # anyio's token of the running loop: an asyncio loop or a trio token, each with its
        # own thread-safe "call this soon" (neither blocks the calling thread)
        loop: Any = anyio.lowlevel.current_token().native_token  # typed as object by anyio
        soon = getattr(loop, "call_soon_threadsafe", None) or loop.run_sync_soon
        self._soon: Callable[[Callable[[], object]], object] = soon

    def wake(self) -> None:
        try:
            self._soon(self.event.set)
        except RuntimeError:
            pass  # the loop has closed; nobody is waiting any more


class Handle:
    """A submitted request: stream it, wait for it, or cancel it.

    ``for delta in handle`` and ``async for delta in handle.astream()`` yield
    text as it is sampled; ``handle.result()`` and ``await handle`` give the
    ``Result``. Iterating after the request finished replays it from the start.
    """

    def __init__(
        self,
        request_id: int,
        prompt: str,
        prompt_tokens: int,
        max_tokens: int,
        canceller: Callable[[Handle], None],
    ) -> None:
        self.id = request_id
        self.prompt = prompt
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.timing = _Timing()
        self._canceller = canceller
        self._cond = threading.Condition()  # new text, for streams
        self._finished = threading.Event()  # the result, for result(): not woken per token
        self._chunks: list[str] = []
        self._status: RequestStatus = "queued"
        self._slot: int | None = None
        self._completion_tokens = 0
        self.cached_tokens = 0  # set by the engine when the request reuses a cached prefix
        self.server_timings: Mapping[str, float] | None = None  # set by a remote engine
        self.model = ""  # set by the engine: its name in the kernel, else its model's
        self._result: Result | None = None
        self._exception: NbollamaError | None = None
        self._wakers: list[_LoopWaker] = []
        self._done_callbacks: list[Callable[[Handle], object]] = []
        self.store_key: str | None = None  # set at submit where the result store keys this request

    # -- what the engine's thread calls -------------------------------------------------

    def _set_running(self, slot: int | None, status: RequestStatus) -> None:
        with self._cond:
            self._slot = slot
            self._status = status
        self._notify()

    def _publish(self, delta: str, completion_tokens: int) -> None:
        """A sampled token: one lock, and waiters woken only when there is text for them."""
        with self._cond:
            self._completion_tokens = completion_tokens
            self._status = "generating"
            if not delta:
                return
            self._chunks.append(delta)
            self._cond.notify_all()
            wakers = list(self._wakers) if self._wakers else ()
        for waker in wakers:
            waker.wake()

    def _finish(
        self,
        finish_reason: FinishReason,
        *,
        tail: str = "",
        error: str | None = None,
        exception: NbollamaError | None = None,
        token_ids: tuple[int, ...] = (),
        **outputs: Any,
    ) -> Result:
        """``outputs``: the ``Result`` fields of what the request asked beyond text (logprobs,
        choice, parsed...)."""
        t = self.timing
        t.finished = time.perf_counter()
        with self._cond:
            if self._result is not None:
                return self._result
            if tail:
                self._chunks.append(tail)
            text = "".join(self._chunks)
            first = t.first_token
            n = self._completion_tokens
            self._result = Result(
                id=self.id,
                prompt=self.prompt,
                text=text,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=n,
                finish_reason=finish_reason,
                error=error,
                ttft=(first - t.submitted) if first is not None else None,
                tpot=((t.finished - first) / (n - 1)) if first is not None and n > 1 else None,
                queue_wait=((t.started or t.finished) - t.submitted),
                total_time=t.finished - t.submitted,
                slot=self._slot,
                cached_tokens=self.cached_tokens,
                server_timings=self.server_timings,
                token_ids=token_ids,
                model=self.model,
                **outputs,
            )
            self._status = _FINAL_STATUS[finish_reason]
            if finish_reason == "error":
                self._exception = exception or RequestFailedError(error or "request failed")
            callbacks, self._done_callbacks = self._done_callbacks, []
        self._finished.set()
        self._notify()
        for callback in callbacks:
            _call_quietly(callback, self)
        return self._result

    def _replay(self, result: Result) -> None:
        """Finish with a result the store kept: no slot, no tokens streamed, the text at once."""
        with self._cond:
            if self._result is not None:
                return
            self._chunks = [result.text]
            self._completion_tokens = result.completion_tokens
            self._result = result
            self._status = "done"
            callbacks, self._done_callbacks = self._done_callbacks, []
        self._finished.set()
        self._notify()
        for callback in callbacks:
            _call_quietly(callback, self)

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()
            wakers = list(self._wakers)
        for waker in wakers:
            waker.wake()

    # -- what callers use -------------------------------------------------------------

    @property
    def status(self) -> RequestStatus:
        return self._status

    @property
    def slot(self) -> int | None:
        """The slot serving (or that served) this request; None while queued."""
        return self._slot

    @property
    def text(self) -> str:
        """The text generated so far."""
        with self._cond:
            return "".join(self._chunks)

    @property
    def completion_tokens(self) -> int:
        return self._completion_tokens

    def done(self) -> bool:
        return self._result is not None

    def exception(self) -> NbollamaError | None:
        """Why the request failed, once it has (``finish_reason == "error"``)."""
        return self._exception

    def cancel(self) -> bool:
        """Cancel the request; its slot is freed at the engine's next step.

        Returns False if it had already finished. The text generated so far is
        kept in the result, whose ``finish_reason`` is ``"cancelled"``.
        """
        if self.done():
            return False
        self._canceller(self)
        return True

    def add_done_callback(self, callback: Callable[[Handle], object]) -> None:
        """Call ``callback(handle)`` when the request finishes (at once if it has).

        It runs on the engine's thread: keep it short and never block it.
        """
        with self._cond:
            if self._result is None:
                self._done_callbacks.append(callback)
                return
        _call_quietly(callback, self)

    def result(self, timeout: float | None = None) -> Result:
        """Wait for the result; ``TimeoutError`` if ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._result is None:
            remaining = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if remaining <= 0:
                raise RequestTimeoutError(f"request {self.id} did not finish within {timeout} s")
            self._finished.wait(remaining)  # short waits keep Ctrl-C responsive
        return self._result

    def __iter__(self) -> Iterator[str]:
        index = 0
        while True:
            with self._cond:
                while index >= len(self._chunks) and self._result is None:
                    self._cond.wait(0.2)
                chunks = self._chunks[index:]
                index += len(chunks)
                finished = self._result is not None and index >= len(self._chunks)
            if chunks:
                yield "".join(chunks)
            if finished:
                return

    async def astream(self) -> AsyncIterator[str]:
        """Yield text deltas as they are sampled, inside any anyio-supported loop."""
        waker = _LoopWaker()
        with self._cond:
            self._wakers.append(waker)
        try:
            index = 0
            while True:
                with self._cond:
                    chunks = self._chunks[index:]
                    index += len(chunks)
                    finished = self._result is not None and index >= len(self._chunks)
                    if not chunks and not finished:
                        waker.event = anyio.Event()
                if chunks:
                    yield "".join(chunks)
                    continue
                if finished:
                    return
                await waker.event.wait()
        finally:
            with self._cond:
                self._wakers.remove(waker)

    async def wait(self) -> Result:
        """``await handle.wait()`` (or just ``await handle``): the result, without blocking the loop."""
        if self._result is not None:
            return self._result
        waker = _LoopWaker()
        with self._cond:
            self._wakers.append(waker)
        try:
            while True:
                with self._cond:
                    if self._result is not None:
                        return self._result
                    waker.event = anyio.Event()
                await waker.event.wait()
        finally:
            with self._cond:
                self._wakers.remove(waker)

    def __await__(self) -> Generator[Any, None, Result]:
        return self.wait().__await__()

    def __repr__(self) -> str:
        return f"<Handle id={self.id} status={self._status} slot={self._slot} tokens={self._completion_tokens}>"


def _call_quietly(callback: Callable[[Handle], object], handle: Handle) -> None:
    try:
        callback(handle)
    except Exception:  # a user's callback must not take the engine's thread down
        import logging

        logging.getLogger("nbollama").exception("done-callback of request %s failed", handle.id)
