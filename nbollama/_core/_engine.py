"""The engine: N slots over one model, one ``llama_decode`` per step for all of them.

Threads and who owns what:

* the caller's thread tokenizes and queues (``submit``), or cancels;
* the engine's own thread (``_run``) owns the slots, the batch, the samplers
  and the context: it admits queued requests, decodes, samples and finishes;
* one monitor thread per engine, started by the first ``subscribe``, turns
  state changes into snapshots for views at a bounded rate.

``_lock`` guards the queue and every slot's request/state assignment; the
engine's thread takes it briefly between decodes, never around one.
"""

from __future__ import annotations

import atexit
import codecs
import itertools
import logging
import os
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .. import memory as _memory
from ..exceptions import (
    EngineClosedError,
    EngineError,
    InvalidParamsError,
    NbollamaError,
    PromptTooLongError,
)
from ..memory import format_bytes
from ..metrics import ThroughputMeter
from ..models import resolve_model
from ._llama import (
    DECODE_NO_KV_SLOT,
    DECODE_OK,
    Batch,
    LlamaContext,
    LlamaModel,
    SamplerChain,
    silence_llama_log,
    supports_gpu_offload,
)
from ._requests import FinishReason, Handle, Result, SamplingParams
from ._scheduler import WaitingQueue
from ._snapshot import (
    SNAPSHOT_VERSION,
    CompletedRequest,
    EngineSnapshot,
    SlotBadge,
    SlotSnapshot,
    SlotState,
)

__all__ = ["Engine", "Subscription"]

logger = logging.getLogger("nbollama")
if not logger.handlers:
    # The effective parallel value must never be a mystery: say it even when
    # the application configured no logging (Jupyter does not).
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

MAX_QUEUE_ENV = "NBOLLAMA_MAX_QUEUE"
NUM_PARALLEL_ENV = "NBOLLAMA_NUM_PARALLEL"
DEFAULT_MAX_QUEUE = 512
_PREVIEW_CHARS = 80
_BADGE_SECONDS = 2.0  # how long a slot shows how its last request ended
_RECENT = 64

_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_SAMPLING_FIELDS = {f for f in SamplingParams.__dataclass_fields__ if f != "stop"}


@atexit.register
def _close_all_engines() -> None:
    """Kernel shutdown: stop the loops before the interpreter tears ctypes down."""
    for engine in list(_live_engines):
        try:
            engine.close()
        except Exception:
            pass
    silence_llama_log()  # C++ teardown may log after Python is gone


class _Weights:
    """A loaded model shared by several engines (the sweep makes one context per parallel value)."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self._refs = 0
        self._lock = threading.Lock()

    def acquire(self) -> _Weights:
        with self._lock:
            if self._refs == 0 and self.model._closed:
                raise EngineClosedError("the model was closed with the last engine that used it; load it again")
            self._refs += 1
        return self

    @contextmanager
    def borrowed(self) -> Iterator[LlamaModel]:
        """Keep the model alive while a caller's thread uses it (tokenizing), even if close() runs meanwhile."""
        self.acquire()
        try:
            yield self.model
        finally:
            self.release()

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self.model.close()


@dataclass(eq=False)
class _Request:
    handle: Handle
    tokens: list[int]
    params: SamplingParams
    priority: int
    preview: str
    cancel_requested: bool = False
    # set when a slot takes it
    sampler: SamplerChain | None = None
    decoder: Any = None
    n_prefilled: int = 0
    admitted_order: int = 0
    generated: str = ""
    emitted: int = 0
    completion_tokens: int = 0
    max_stop: int = 0


@dataclass(eq=False)
class _Slot:
    id: int
    state: SlotState = "idle"
    request: _Request | None = None
    n_past: int = 0  # tokens of this sequence in the KV cache
    last_token: int = 0  # sampled, not yet decoded
    last_request_id: int | None = None
    last_preview: str = ""
    last_badge: SlotBadge = "idle"
    last_finished: float = 0.0
    last_counts: tuple[int, int, int] = (0, 0, 0)  # prompt, decoded, max of the last request


class Subscription:
    """A live subscription to an engine's snapshots; ``close()`` stops the calls."""

    def __init__(self, engine: Engine, callback: Callable[[EngineSnapshot], object], interval: float):
        self.engine = engine
        self.callback = callback
        self.interval = interval
        self.last_sent = 0.0
        self.last_seq = -1
        self.last_throughput = -1.0
        self.last_badges = -1
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.engine._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Totals:
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0


@dataclass
class _Config:
    model_path: Path
    parallel: int
    ctx_per_slot: int
    n_batch: int
    threads: int
    gpu_layers: int
    max_queue: int
    parallel_reason: str
    flash_attn: bool | None = None
    kv_unified: bool = False
    load_seconds: float = 0.0


def _validate_load_args(parallel: int | str, ctx: int, n_batch: int, threads: int | None) -> None:
    if parallel != "auto" and (not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1):
        raise InvalidParamsError(f"parallel={parallel!r}: must be 'auto' or a whole number >= 1")
    if not isinstance(ctx, int) or ctx < 32:
        raise InvalidParamsError(f"ctx={ctx!r}: the context of one slot must be >= 32 tokens")
    if not isinstance(n_batch, int) or n_batch < 1:
        raise InvalidParamsError(f"n_batch={n_batch!r}: must be a whole number >= 1")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InvalidParamsError(f"threads={threads!r}: must be a whole number >= 1")


def _max_queue(value: int | None) -> int:
    if value is not None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidParamsError(f"max_queue={value!r}: must be a whole number >= 1")
        return value
    env = os.environ.get(MAX_QUEUE_ENV)
    if not env:
        return DEFAULT_MAX_QUEUE
    try:
        size = int(env)
    except ValueError:
        raise InvalidParamsError(f"{MAX_QUEUE_ENV}={env!r} is not a whole number") from None
    if size < 1:
        raise InvalidParamsError(f"{MAX_QUEUE_ENV}={size} must be >= 1")
    return size


class Engine:
    """N parallel slots serving one model, with continuous batching.

    Make one with ``Engine.load(...)``; use it as a context manager or call
    ``close()`` to free the context and the weights.
    """

    _ids = itertools.count(1)

    # -- construction --------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        parallel: int | Literal["auto"] = "auto",
        ctx: int = 2048,
        n_batch: int = 512,
        gpu_layers: int | Literal["auto"] = "auto",
        threads: int | None = None,
        max_queue: int | None = None,
        flash_attn: bool | Literal["auto"] = "auto",
        kv_unified: bool = False,
    ) -> Engine:
        """Load a GGUF model (``None``/``"default"``: the bundled Gemma 3 270M) and start the slots.

        ``ctx`` is the context of ONE slot; the KV cache holds ``parallel x ctx``
        tokens. ``gpu_layers="auto"`` offloads every layer when llama.cpp was
        built with a GPU backend, none otherwise. ``flash_attn`` and
        ``kv_unified`` pass through to llama.cpp (``kv_unified=True`` lets all
        slots share one KV buffer instead of one stream each).
        """
        _validate_load_args(parallel, ctx, n_batch, threads)
        started = time.perf_counter()
        path = resolve_model(model)
        if gpu_layers == "auto":
            layers = -1 if supports_gpu_offload() else 0
        elif isinstance(gpu_layers, int) and not isinstance(gpu_layers, bool):
            layers = gpu_layers
        else:
            raise InvalidParamsError(f"gpu_layers={gpu_layers!r}: must be 'auto' or a whole number")
        weights = _Weights(LlamaModel(path, gpu_layers=layers)).acquire()
        try:
            return cls._on_weights(
                weights,
                parallel=parallel,
                ctx=ctx,
                n_batch=n_batch,
                threads=threads,
                max_queue=max_queue,
                started=started,
                flash_attn=None if flash_attn == "auto" else bool(flash_attn),
                kv_unified=kv_unified,
            )
        finally:
            weights.release()

    @classmethod
    def _on_weights(
        cls,
        weights: _Weights,
        *,
        parallel: int | Literal["auto"],
        ctx: int,
        n_batch: int,
        threads: int | None,
        max_queue: int | None,
        started: float,
        flash_attn: bool | None = None,
        kv_unified: bool = False,
    ) -> Engine:
        model = weights.model
        per_slot = model.kv_geometry.bytes_per_token * ctx
        if model.is_recurrent or model.is_hybrid:
            kind = "recurrent" if model.is_recurrent else "hybrid"
            reason = (
                f"parallel=1: {model.arch} is a {kind} architecture, whose per-sequence state "
                "llama.cpp cannot batch like a KV cache"
            )
            if parallel != 1:
                warnings.warn(f"nbollama: {reason}", RuntimeWarning, stacklevel=3)
            n_parallel = 1
        elif parallel == "auto":
            # compute + output buffers: logits rows for every slot and the batch's activations
            shared = model.n_vocab * 4 * _memory.AUTO_PARALLEL + n_batch * model.n_embd * 4 * 16
            choice = _memory.choose_parallel(
                per_slot,
                shared,
                on_gpu=model.gpu_layers != 0,
                env_value=os.environ.get(NUM_PARALLEL_ENV),
            )
            n_parallel, reason = choice.parallel, choice.reason
        else:
            n_parallel, reason = int(parallel), f"parallel={parallel} as asked"
        config = _Config(
            model_path=model.path,
            parallel=n_parallel,
            ctx_per_slot=ctx,
            n_batch=n_batch,
            threads=threads or max(1, os.cpu_count() or 1),
            gpu_layers=model.gpu_layers,
            max_queue=_max_queue(max_queue),
            parallel_reason=reason,
            flash_attn=flash_attn,
            kv_unified=kv_unified,
        )
        engine = cls(weights, config)
        engine._config.load_seconds = time.perf_counter() - started
        logger.info(engine.summary)
        return engine

    def __init__(self, weights: _Weights, config: _Config) -> None:
        """Use ``Engine.load`` (or ``engine.spawn``); this takes already-loaded weights."""
        self.id = next(self._ids)
        self._weights = weights.acquire()
        self._model = weights.model
        try:
            self._context = LlamaContext(
                self._model,
                n_seq=config.parallel,
                ctx_per_slot=config.ctx_per_slot,
                n_batch=config.n_batch,
                threads=config.threads,
                flash_attn=config.flash_attn,
                kv_unified=config.kv_unified,
            )
        except BaseException:
            self._weights.release()
            raise
        try:
            config.ctx_per_slot = self._context.ctx_per_slot
            self._config = config
            self._batch = Batch(config.n_batch)
            self._slots = [_Slot(i) for i in range(config.parallel)]
            self._queue: WaitingQueue[_Request] = WaitingQueue(config.max_queue)
            self._requests: dict[int, _Request] = {}
            self._lock = threading.RLock()
            self._wakeup = threading.Condition(self._lock)
            self._closing = False
            self._closed = False
            self._close_started = False
            self._close_done = threading.Event()
            self._seq = 0
            self._request_ids = itertools.count(1)
            self._admit_order = itertools.count()
            self._meter = ThroughputMeter()
            self._totals = _Totals()
            self._recent: deque[CompletedRequest] = deque(maxlen=_RECENT)
            self._subscriptions: list[Subscription] = []
            self._monitor: threading.Thread | None = None
            self._monitor_wakeup = threading.Event()
            self._fatal: str | None = None
        except BaseException:
            if getattr(self, "_batch", None) is not None:
                self._batch.free()
            self._context.close()
            self._weights.release()
            raise
        self._thread = threading.Thread(target=self._run, name=f"nbollama-engine-{self.id}", daemon=True)
        self._thread.start()
        _live_engines.add(self)

    def spawn(
        self,
        *,
        parallel: int,
        ctx: int | None = None,
        n_batch: int | None = None,
        max_queue: int | None = None,
    ) -> Engine:
        """A new engine on the SAME loaded weights with its own context and slots.

        The model file is not read again; this engine keeps running. Used by
        the parallelism sweep, which tries several ``parallel`` values in turn.
        """
        self._check_open()
        ctx = self._config.ctx_per_slot if ctx is None else ctx
        n_batch = self._config.n_batch if n_batch is None else n_batch
        _validate_load_args(parallel, ctx, n_batch, None)
        return self._on_weights(
            self._weights,
            parallel=parallel,
            ctx=ctx,
            n_batch=n_batch,
            threads=self._config.threads,
            max_queue=self._config.max_queue if max_queue is None else max_queue,
            started=time.perf_counter(),
            flash_attn=self._config.flash_attn,
            kv_unified=self._config.kv_unified,
        )

    # -- what it is ------------------------------------------------------------------

    @property
    def parallel(self) -> int:
        """The effective number of slots."""
        return self._config.parallel

    @property
    def parallel_reason(self) -> str:
        return self._config.parallel_reason

    @property
    def ctx(self) -> int:
        """Tokens of context per slot."""
        return self._config.ctx_per_slot

    @property
    def n_batch(self) -> int:
        return self._config.n_batch

    @property
    def threads(self) -> int:
        return self._config.threads

    @property
    def gpu_layers(self) -> int:
        return self._config.gpu_layers

    @property
    def model_name(self) -> str:
        return self._model.name

    @property
    def model_path(self) -> Path:
        return self._config.model_path

    @property
    def kv_bytes(self) -> int:
        """Size of the KV cache buffers llama.cpp allocated (from its own report)."""
        return self._context.kv_bytes or self.kv_estimate_bytes

    @property
    def kv_estimate_bytes(self) -> int:
        return self._model.kv_geometry.bytes_per_token * self.parallel * self.ctx

    @property
    def kv_estimate(self) -> str:
        per_token = self._model.kv_geometry.bytes_per_token
        return (
            f"{self.parallel} slots x {self.ctx} ctx x {format_bytes(per_token)}/token "
            f"= {format_bytes(per_token * self.parallel * self.ctx)} at most"
        )

    @property
    def load_seconds(self) -> float:
        return self._config.load_seconds

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def summary(self) -> str:
        """The one line that says what was loaded and why parallel is what it is."""
        return (
            f"nbollama: model={self.model_name} parallel={self.parallel} ctx/slot={self.ctx} "
            f"kv={format_bytes(self.kv_bytes)} n_batch={self.n_batch} threads={self.threads} "
            f"gpu_layers={self.gpu_layers} load={self.load_seconds:.1f}s ({self.parallel_reason})"
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"parallel={self.parallel} ctx/slot={self.ctx}"
        return f"<nbollama.Engine {self.model_name!r} {state}>"

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        self._check_open()
        with self._weights.borrowed() as model:
            return model.tokenize(text, add_special=add_special)

    # -- submitting -----------------------------------------------------------------

    def submit(
        self,
        prompt: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Iterable[str] = (),
        priority: int = 0,
        chat: bool = False,
        system: str | None = None,
    ) -> Handle:
        """Queue one prompt; returns at once with a ``Handle``.

        Raises ``QueueFullError`` when the queue is full and ``InvalidParamsError``
        for bad parameters. A prompt too long for a slot does not raise: its
        handle finishes at once with ``finish_reason="error"``, so a batch of
        prompts still runs the others.
        """
        return self._enqueue(
            [
                self._prepare(
                    prompt,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    min_p=min_p,
                    repeat_penalty=repeat_penalty,
                    seed=seed,
                    stop=stop,
                    priority=priority,
                    chat=chat,
                    system=system,
                )
            ]
        )[0]

    def _prepare(
        self,
        prompt: str,
        *,
        priority: int = 0,
        chat: bool = False,
        system: str | None = None,
        stop: str | Iterable[str] = (),
        **sampling: Any,
    ) -> _Request:
        """Validate and tokenize in the caller's thread; a prompt that cannot run is finished here."""
        self._check_open()
        if not isinstance(prompt, str):
            raise InvalidParamsError(f"prompt must be a str, got {type(prompt).__name__}")
        unknown = set(sampling) - _SAMPLING_FIELDS
        if unknown:
            raise InvalidParamsError(
                f"unknown parameter(s) {sorted(unknown)}; known: "
                f"{sorted(_SAMPLING_FIELDS | {'priority', 'chat', 'system', 'stop'})}"
            )
        params = SamplingParams(stop=(stop,) if isinstance(stop, str) else tuple(stop), **sampling)
        if not isinstance(priority, int):
            raise InvalidParamsError(f"priority={priority!r}: must be a whole number")
        if system and not chat:
            raise InvalidParamsError("system= needs chat=True (the system message goes through the chat template)")
        with self._weights.borrowed() as model:
            text = prompt
            if chat:
                messages = ([("system", system)] if system else []) + [("user", prompt)]
                try:
                    text = model.apply_chat_template(messages)
                except ValueError as exc:
                    raise InvalidParamsError(str(exc)) from None
            tokens = model.tokenize(text)
        handle = Handle(next(self._request_ids), prompt, len(tokens), params.max_tokens, self._cancel)
        request = _Request(
            handle=handle,
            tokens=tokens,
            params=params,
            priority=priority,
            preview=" ".join(prompt.split())[:_PREVIEW_CHARS],
            max_stop=max((len(s) for s in params.stop), default=0),
        )
        if not tokens:
            handle._finish("error", error="the prompt is empty (no tokens)", exception=InvalidParamsError("empty prompt"))
        elif len(tokens) >= self.ctx:
            message = (
                f"the prompt is {len(tokens)} tokens but one slot holds {self.ctx} (ctx per slot); "
                f"shorten it or load with a larger ctx (e.g. ctx={_next_pow2(len(tokens) + params.max_tokens)})"
            )
            handle._finish("error", error=message, exception=PromptTooLongError(message))
        return request

    def _enqueue(self, requests: list[_Request]) -> list[Handle]:
        """Queue requests in one step, so the loop's next admission sees all of them together
        (which makes a batch of prompts reproducible at a given parallel); all or none."""
        runnable = [r for r in requests if not r.handle.done()]
        with self._lock:
            self._check_open()
            self._queue.push_all([(r, r.priority) for r in runnable])
            for request in runnable:
                self._requests[request.handle.id] = request
            self._totals.submitted += len(requests)
            self._totals.errors += len(requests) - len(runnable)
            self._seq += 1
            self._wakeup.notify()
        return [r.handle for r in requests]

    def _submit_all(self, prompts: str | Iterable[str], params: dict[str, Any]) -> list[Handle]:
        if isinstance(prompts, str):
            prompts = [prompts]
        return self._enqueue([self._prepare(prompt, **params) for prompt in prompts])

    def generate(self, prompts: str | Iterable[str], **params: Any) -> list[Result]:
        """Submit every prompt at once and wait; results come in input order.

        Ctrl-C (KeyboardInterrupt) cancels this call's requests and frees their slots.
        """
        if threading.current_thread() is self._thread:
            raise EngineError("generate() cannot wait from the engine's own thread (a done-callback); use submit()")
        handles = self._submit_all(prompts, params)
        try:
            return [h.result() for h in handles]
        except BaseException:
            for h in handles:
                h.cancel()
            raise

    async def agenerate(self, prompts: str | Iterable[str], **params: Any) -> list[Result]:
        """``generate`` for event loops (asyncio, trio, anyio); cancelling the task cancels the requests."""
        handles = self._submit_all(prompts, params)
        try:
            return [await h.wait() for h in handles]
        except BaseException:
            for h in handles:
                h.cancel()
            raise

    # -- cancelling -----------------------------------------------------------------

    def _cancel(self, handle: Handle) -> None:
        with self._lock:
            request = self._requests.get(handle.id)
            if request is None:
                return
            if self._queue.remove(request):
                self._requests.pop(handle.id, None)
                self._totals.cancelled += 1
                self._seq += 1
                queued = True
            else:
                request.cancel_requested = True
                queued = False
                self._wakeup.notify()
        if queued:
            handle._finish("cancelled")

    def cancel_slot(self, slot: int) -> int | None:
        """Cancel whatever the slot is serving; the request id, or None if it was idle."""
        if not isinstance(slot, int) or not 0 <= slot < self.parallel:
            raise ValueError(f"slot {slot!r} does not exist (this engine has slots 0..{self.parallel - 1})")
        with self._lock:
            request = self._slots[slot].request
        if request is None:
            return None
        request.handle.cancel()
        return request.handle.id

    def cancel_all(self) -> int:
        """Cancel every queued and running request; how many were cancelled."""
        with self._lock:
            requests = list(self._requests.values())
        return sum(1 for r in requests if r.handle.cancel())

    # -- the batch loop (engine thread) -----------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._closing and not self._has_work():
                        self._wakeup.wait()
                    if self._closing:
                        break
                    finished = self._take_cancellations()
                    self._admit()
                for slot in finished:
                    self._finish(slot, "cancelled")
                if any(s.state != "idle" for s in self._slots):
                    self._step()
        except BaseException as exc:  # a bug or a fatal llama.cpp error: fail loudly, not silently
            self._fatal = f"{type(exc).__name__}: {exc}"
            logger.exception("nbollama: the engine loop stopped")
        finally:
            with self._lock:
                self._closing = True  # from here on submit() refuses: nothing new can strand
            reason: FinishReason = "error" if self._fatal else "cancelled"
            message = self._fatal or "the engine was closed"
            for slot in self._slots:
                try:
                    self._finish(slot, reason, error=message)
                except BaseException:
                    logger.exception("nbollama: finishing slot %s at shutdown failed", slot.id)
            with self._lock:
                self._queue.drain()
                leftovers = list(self._requests.values())
                self._requests.clear()
            for request in leftovers:  # queued, or taken from the queue when the loop stopped
                if request.sampler is not None:
                    request.sampler.free()
                    request.sampler = None
                request.handle._finish(reason, error=message)

    def _has_work(self) -> bool:
        return bool(self._queue) or any(s.state != "idle" for s in self._slots)

    def _take_cancellations(self) -> list[_Slot]:
        return [s for s in self._slots if s.request is not None and s.request.cancel_requested]

    def _admit(self) -> None:
        """Give idle slots the next queued requests (highest priority first)."""
        for slot in self._slots:
            if slot.state != "idle" or slot.request is not None:
                continue
            request = self._queue.pop()
            if request is None:
                return
            try:
                self._start(slot, request)
            except Exception as exc:  # e.g. a sampler llama.cpp refused: fail this request, not the loop
                if request.sampler is not None:
                    request.sampler.free()
                    request.sampler = None
                slot.request = None
                slot.state = "idle"
                self._requests.pop(request.handle.id, None)
                self._totals.errors += 1
                request.handle._finish("error", error=f"could not start the request: {exc}")

    def _start(self, slot: _Slot, request: _Request) -> None:
        """Put a request in a slot: its own sampler chain and a clean KV sequence."""
        p = request.params
        request.sampler = SamplerChain(p, n_vocab=self._model.n_vocab)
        if p.repeat_penalty != 1.0:
            request.sampler.accept_prompt(request.tokens)
        request.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        request.admitted_order = next(self._admit_order)
        self._context.clear_sequence(slot.id)
        slot.request = request
        slot.state = "prefill"
        slot.n_past = 0
        request.handle.timing.started = time.perf_counter()
        request.handle._set_running(slot.id, "prefill")
        self._seq += 1

    def _step(self) -> None:
        """One ``llama_decode``: a token for every generating slot plus prompt chunks."""
        generating = [s for s in self._slots if s.state == "generating"]
        prefilling = sorted(
            (s for s in self._slots if s.state == "prefill"),
            key=lambda s: s.request.admitted_order,  # type: ignore[union-attr]
        )
        prefill_budget = self._config.n_batch - len(generating)
        batch = self._batch
        while True:
            batch.clear()
            outputs: list[tuple[_Slot, int]] = []
            chunks: list[tuple[_Slot, int]] = []
            for slot in generating:
                outputs.append((slot, batch.add(slot.last_token, slot.n_past, slot.id, True)))
            budget = prefill_budget
            for slot in prefilling:
                if budget <= 0:
                    break
                request = slot.request
                assert request is not None
                start = request.n_prefilled
                n = min(budget, len(request.tokens) - start)
                last = len(request.tokens) - 1
                for pos in range(start, start + n):
                    index = batch.add(request.tokens[pos], pos, slot.id, pos == last)
                    if pos == last:
                        outputs.append((slot, index))
                chunks.append((slot, n))
                budget -= n
            if batch.n_tokens == 0:
                return
            status = self._context.decode(batch)
            if status == DECODE_OK:
                break
            if status == DECODE_NO_KV_SLOT:
                if chunks and prefill_budget > 1:
                    prefill_budget //= 2  # retry with smaller prompt chunks
                    continue
                # Not even one token per slot fits: fail the longest sequence, keep the rest.
                victim = max(generating + prefilling, key=lambda s: s.n_past)
                self._finish(victim, "error", error="the KV cache has no room left for this sequence (llama_decode returned 1)")
                generating = [s for s in generating if s is not victim]
                prefilling = [s for s in prefilling if s is not victim]
                continue
            for slot in {s for s, _ in outputs} | {s for s, _ in chunks}:
                self._finish(slot, "error", error=f"llama_decode failed with status {status}; this request was dropped, the others go on")
            return
        now = time.perf_counter()
        for slot in generating:
            slot.n_past += 1
        prompt_tokens = 0
        for slot, n in chunks:
            request = slot.request
            assert request is not None
            request.n_prefilled += n
            slot.n_past += n
            prompt_tokens += n
        produced = 0
        for slot, index in outputs:
            request = slot.request
            assert request is not None and request.sampler is not None
            produced += self._accept(slot, request, request.sampler.sample(self._context, index), now)
        self._meter.add(produced)
        with self._lock:
            self._totals.prompt_tokens += prompt_tokens
            self._totals.generated_tokens += produced
            self._seq += 1

    def _accept(self, slot: _Slot, request: _Request, token: int, now: float) -> int:
        """Take a sampled token: stream its text or finish the request. Returns tokens produced."""
        handle = request.handle
        if handle.timing.first_token is None:
            handle.timing.first_token = now
        if self._model.is_eog(token):
            self._finish(slot, "stop")
            return 0
        request.completion_tokens += 1
        before = len(request.generated)
        request.generated += request.decoder.decode(self._model.piece(token))
        safe = len(request.generated)
        if request.max_stop:
            hit = _find_stop(request.generated, request.params.stop, max(0, before - request.max_stop))
            if hit >= 0:
                request.generated = request.generated[:hit]
                self._finish(slot, "stop", flush=False)
                return 1
            safe -= _held_back(request.generated, request.params.stop)
        if safe > request.emitted:
            delta = request.generated[request.emitted : safe]
            request.emitted = safe
        else:
            delta = ""
        handle._publish(delta, request.completion_tokens)
        if request.completion_tokens >= request.params.max_tokens:
            self._finish(slot, "length")
        elif slot.n_past >= self.ctx:
            self._finish(slot, "length")  # the slot's context is full
        else:
            slot.last_token = token
            if slot.state != "generating":
                with self._lock:
                    slot.state = "generating"
                    self._seq += 1
        return 1

    def _finish(self, slot: _Slot, reason: FinishReason, *, error: str | None = None, flush: bool = True) -> None:
        request = slot.request
        if request is None:
            return
        if flush and request.decoder is not None:
            request.decoder.errors = "ignore"  # drop a multi-byte character cut off at the end
            request.generated += request.decoder.decode(b"", final=True)
        tail = request.generated[request.emitted :]
        request.emitted = len(request.generated)
        if request.sampler is not None:
            request.sampler.free()
            request.sampler = None
        self._context.clear_sequence(slot.id)
        with self._lock:
            slot.request = None
            slot.state = "idle"
            slot.n_past = 0
            slot.last_request_id = request.handle.id
            slot.last_preview = request.preview
            slot.last_badge = {"stop": "done", "length": "done", "cancelled": "cancelled", "error": "error"}[reason]  # type: ignore[assignment]
            slot.last_finished = time.monotonic()
            slot.last_counts = (len(request.tokens), request.completion_tokens, request.params.max_tokens)
            self._requests.pop(request.handle.id, None)
            if reason in ("stop", "length"):
                self._totals.completed += 1
            elif reason == "cancelled":
                self._totals.cancelled += 1
            else:
                self._totals.errors += 1
            self._seq += 1
        exception: NbollamaError | None = EngineError(error) if reason == "error" and error else None
        result = request.handle._finish(reason, tail=tail, error=error, exception=exception)
        self._recent.append(
            CompletedRequest(
                id=result.id,
                slot=result.slot,
                finish_reason=result.finish_reason,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                ttft=result.ttft,
                tpot=result.tpot,
                queue_wait=result.queue_wait,
                total_time=result.total_time,
                finished_at=time.time(),
            )
        )

    # -- looking at it ---------------------------------------------------------------

    def snapshot(self) -> EngineSnapshot:
        """Plain, JSON-ready data for views: slots, queue, throughput, KV, memory."""
        now_mono = time.monotonic()
        now_perf = time.perf_counter()
        with self._lock:
            slots: list[SlotSnapshot] = []
            for s in self._slots:
                r = s.request
                if r is not None:
                    first = r.handle.timing.first_token
                    elapsed = now_perf - first if first is not None else 0.0
                    slots.append(
                        SlotSnapshot(
                            id=s.id,
                            state=s.state,
                            badge=s.state,
                            request_id=r.handle.id,
                            prompt_preview=r.preview,
                            prompt_tokens=len(r.tokens),
                            prefilled_tokens=r.n_prefilled,
                            decoded_tokens=r.completion_tokens,
                            max_tokens=r.params.max_tokens,
                            tps=round(r.completion_tokens / elapsed, 2) if elapsed > 0.05 else 0.0,
                            kv_used=s.n_past,
                        )
                    )
                else:
                    recent = now_mono - s.last_finished < _BADGE_SECONDS and s.last_request_id is not None
                    prompt, decoded, max_tokens = s.last_counts
                    slots.append(
                        SlotSnapshot(
                            id=s.id,
                            state="idle",
                            badge=s.last_badge if recent else "idle",
                            request_id=s.last_request_id,
                            prompt_preview=s.last_preview,
                            prompt_tokens=prompt,
                            prefilled_tokens=prompt,
                            decoded_tokens=decoded,
                            max_tokens=max_tokens,
                            tps=0.0,
                            kv_used=0,
                        )
                    )
            queue_length = len(self._queue)
            totals = dict(vars(self._totals))
            seq = self._seq
            recent_done = list(self._recent)[-16:]
        kv_used = sum(s["kv_used"] for s in slots)
        return EngineSnapshot(
            v=SNAPSHOT_VERSION,
            time=time.time(),
            seq=seq,
            closed=self._closed,
            model={
                "name": self._model.name,
                "path": str(self._config.model_path),
                "arch": self._model.arch,
                "size_bytes": self._model.size_bytes,
                "n_params": self._model.n_params,
            },
            parallel=self.parallel,
            ctx_per_slot=self.ctx,
            n_batch=self.n_batch,
            gpu_layers=self.gpu_layers,
            parallel_reason=self.parallel_reason,
            slots=slots,
            queue={"length": queue_length, "max": self._queue.max_size},
            throughput=round(self._meter.rate(), 2),
            throughput_window=self._meter.window,
            busy_slots=sum(1 for s in slots if s["state"] != "idle"),
            kv={"used": kv_used, "total": self.parallel * self.ctx, "bytes": self.kv_bytes},
            memory=_memory.memory_figures(self.kv_bytes, self.kv_estimate),
            totals=totals,  # type: ignore[typeddict-item]
            recent=recent_done,
        )

    def subscribe(
        self, callback: Callable[[EngineSnapshot], object], *, interval: float = 0.25
    ) -> Subscription:
        """Call ``callback(snapshot)`` from a background thread when something changed,
        at most once per ``interval`` seconds (4 Hz by default)."""
        if interval <= 0:
            raise InvalidParamsError(f"interval={interval!r}: must be > 0 seconds")
        subscription = Subscription(self, callback, interval)
        with self._lock:
            self._subscriptions.append(subscription)
            if self._monitor is None:
                self._monitor = threading.Thread(target=self._monitor_loop, name=f"nbollama-monitor-{self.id}", daemon=True)
                self._monitor.start()
        self._monitor_wakeup.set()
        return subscription

    def _badges_showing(self, now: float) -> int:
        return sum(
            1
            for s in self._slots
            if s.request is None and s.last_request_id is not None and now - s.last_finished < _BADGE_SECONDS
        )

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)

    def _monitor_loop(self) -> None:
        while not self._closed:
            with self._lock:
                subs = list(self._subscriptions)
            now = time.monotonic()
            due = [s for s in subs if now - s.last_sent >= s.interval]
            snap: EngineSnapshot | None = None
            if due:
                seq = self._seq
                throughput = round(self._meter.rate(), 1)
                badges = self._badges_showing(now)  # an expiring "done" badge is a change too
                for sub in due:
                    if sub.closed or (sub.last_seq, sub.last_throughput, sub.last_badges) == (seq, throughput, badges):
                        continue
                    sub.last_sent, sub.last_seq, sub.last_throughput, sub.last_badges = now, seq, throughput, badges
                    try:
                        if snap is None:
                            snap = self.snapshot()
                        sub.callback(snap)
                    except Exception:
                        logger.exception("nbollama: a snapshot subscriber failed; it stays subscribed")
            wait = min((s.interval for s in subs), default=1.0)
            self._monitor_wakeup.clear()
            if not self._closing:
                self._monitor_wakeup.wait(wait)
        # one last snapshot so views can show "closed"
        final = self.snapshot() if self._subscriptions else None
        for sub in list(self._subscriptions):
            try:
                sub.callback(final)  # type: ignore[arg-type]
            except Exception:
                pass

    # -- closing --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing or self._closed:
            raise EngineClosedError(
                f"this engine was closed{'' if not self._fatal else ' after an error: ' + self._fatal}; "
                "load a new one (nbollama.Engine.load or %nbollama load)"
            )

    def close(self) -> None:
        """Cancel what is queued or running, stop the loop, free the context and the weights.

        Safe to call twice, from several threads at once (the second caller
        waits for the first) and from a snapshot subscriber; not from a
        done-callback, which runs on the engine's own thread.
        """
        if threading.current_thread() is self._thread:
            raise EngineError("close() cannot be called from the engine's own thread (a done-callback)")
        with self._lock:
            first = not self._close_started
            self._close_started = True
            self._closing = True
            self._wakeup.notify_all()
        if not first:
            self._close_done.wait()
            return
        try:
            self._thread.join()
            with self._lock:
                self._seq += 1
            self._monitor_wakeup.set()
            if self._monitor is not None and self._monitor is not threading.current_thread():
                self._monitor.join(timeout=5)
        finally:
            self._closed = True
            self._batch.free()
            self._context.close()
            self._weights.release()
            _live_engines.discard(self)
            self._close_done.set()

def _find_stop(text: str, stops: Sequence[str], start: int) -> int:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that might be the start of a stop string."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


def _next_pow2(n: int) -> int:
    return 1 << max(5, (n - 1).bit_length())
