"""The engine: N slots over one model, one ``llama_decode`` per step for all of them.

Threads and who owns what:

* the caller's thread checks parameters, tokenizes and queues (``submit_many``),
  or cancels;
* the engine's own thread owns the slots' progress, the runner and the
  samplers. Each step is nano-vllm's: schedule (admit, plan), run (decode and
  sample, in ``ModelRunner``), postprocess (text, stops, finishing);
* a monitor thread, started by the first ``subscribe``, turns changes into
  snapshots for views at a bounded rate.

``_lock`` guards the queue and every slot's request and state; the engine's
thread takes it briefly between decodes, never around one.
"""

from __future__ import annotations

import atexit
import itertools
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .. import memory as _memory
from .._logging import logger
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
from ._adaptive import ParallelController
from ._config import EngineConfig, LoadOptions, Weights
from ._llama import (
    DECODE_NO_KV_SLOT,
    DECODE_OK,
    LlamaContext,
    LlamaModel,
    release_openmp_threads,
    silence_llama_log,
    supports_gpu_offload,
)
from ._monitor import Monitor, Subscription
from ._prefix import common_prefix
from ._requests import FinishReason, Handle, Result, SamplingParams, check_request_params
from ._runner import INVARIANT_ROWS, ModelRunner, StepOutcome
from ._scheduler import Scheduler, plan_step
from ._slots import BADGE_SECONDS, Request, Slot
from ._snapshot import (
    SNAPSHOT_VERSION,
    CompletedRequest,
    EngineSnapshot,
    ParallelChange,
    completed_request,
)
from ._text import TextStream

__all__ = ["Engine"]

_PREVIEW_CHARS = 80
#: Reproducible mode cuts prompts at multiples of this many tokens from position 0,
#: so a prompt's chunks, and the prefixes that can be reused, depend on it alone.
REPRODUCIBLE_CHUNK = 128
_RECENT = 64
_HISTORY = 32  # adaptive parallelism's changes kept for views

_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _close_all_engines() -> None:
    """Kernel shutdown: stop the loops before the interpreter tears ctypes down."""
    for engine in list(_live_engines):
        try:
            engine.close()
        except Exception:
            pass
    silence_llama_log()  # C++ teardown may log after Python is gone


class _Totals:
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

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


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
        parallel: int | Literal["auto", "adaptive"] = "auto",
        ctx: int = 2048,
        n_batch: int = 512,
        gpu_layers: int | Literal["auto"] = "auto",
        threads: int | None = None,
        max_queue: int | None = None,
        flash_attn: bool | Literal["auto"] = "auto",
        kv_unified: bool = False,
        prefix_cache: bool = True,
        reproducible: bool = False,
        max_parallel: int | None = None,
        min_tps: float | None = None,
        max_ttft: float | None = None,
    ) -> Engine:
        """Load a GGUF model (``None``/``"default"``: the bundled Gemma 3 270M) and start the slots.

        ``ctx`` is the context of ONE slot; the KV cache holds ``parallel x ctx``
        tokens. ``gpu_layers="auto"`` offloads every layer when llama.cpp was
        built with a GPU backend, none otherwise. ``flash_attn`` and
        ``kv_unified`` pass through to llama.cpp (``kv_unified=True`` lets all
        slots share one KV buffer instead of one stream each).
        ``prefix_cache`` keeps each slot's tokens after its request and reuses
        shared prompt prefixes (``False`` prefills every prompt in full).
        ``reproducible=True`` makes a request's tokens depend only on the model,
        its prompt, its sampling parameters (seed included), ``ctx`` and
        ``threads``: not on ``parallel``, the slot, or what else runs.
        ``parallel="adaptive"`` reserves ``max_parallel`` slots (default 8) and
        moves how many take requests while it runs, towards ``min_tps`` (each
        running request keeps that many tokens/s), ``max_ttft`` (seconds to the
        first token, queue wait included), or with neither, the most
        throughput short of where one more slot adds less than 5%.
        """
        options = LoadOptions.check(
            parallel=parallel,
            ctx=ctx,
            n_batch=n_batch,
            gpu_layers=gpu_layers,
            threads=threads,
            max_queue=max_queue,
            flash_attn=flash_attn,
            kv_unified=kv_unified,
            prefix_cache=prefix_cache,
            reproducible=reproducible,
            max_parallel=max_parallel,
            min_tps=min_tps,
            max_ttft=max_ttft,
        )
        started = time.perf_counter()
        path = resolve_model(model)
        release_openmp_threads()  # see its docstring: an idle team on this thread slows every engine
        weights = Weights(
            LlamaModel(path, gpu_layers=options.layers(supports_gpu_offload()))
        ).acquire()
        try:
            return cls._on_weights(weights, options, started)
        finally:
            weights.release()

    @classmethod
    def _on_weights(
        cls, weights: Weights, options: LoadOptions, started: float, *, threads: int | None = None
    ) -> Engine:
        config = EngineConfig.resolve(weights.model, options, threads=threads)
        engine = cls(weights, config)
        config.load_seconds = time.perf_counter() - started
        logger.info(engine.summary)
        return engine

    def __init__(self, weights: Weights, config: EngineConfig) -> None:
        """Use ``Engine.load`` (or ``engine.spawn``); this takes already-loaded weights."""
        self.id = next(self._ids)
        self._weights = weights.acquire()
        self._model = weights.model
        try:
            context = LlamaContext(
                self._model,
                # reproducible mode pads every decode to INVARIANT_ROWS sequences: spare ones if needed
                n_seq=max(config.parallel, INVARIANT_ROWS)
                if config.reproducible
                else config.parallel,
                ctx_per_slot=config.ctx_per_slot,
                n_batch=config.n_batch,
                threads=config.threads,
                flash_attn=config.flash_attn,
                kv_unified=config.kv_unified,
            )
        except BaseException:
            self._weights.release()
            raise
        config.ctx_per_slot = context.ctx_per_slot
        self._config = config
        self._runner = ModelRunner(
            self._model, context, config.n_batch, invariant=config.reproducible
        )
        self._slots = [Slot(i) for i in range(config.parallel)]
        self._chunk_size = REPRODUCIBLE_CHUNK if config.reproducible else None
        self._scheduler = Scheduler(
            config.max_queue, prefix_cache=config.prefix_cache, chunk_size=self._chunk_size
        )
        self._controller = (
            ParallelController(config.parallel, config.adaptive)
            if config.adaptive is not None
            else None
        )
        self._parallel_history: deque[ParallelChange] = deque(maxlen=_HISTORY)
        self._shared_prefills = 0
        self._requests: dict[int, Request] = {}
        self._lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        self._closing = False
        self._closed = False
        self._close_started = False
        self._close_done = threading.Event()
        self._fatal: str | None = None
        self._seq = 0  # increases whenever something a view shows changed
        self._request_ids = itertools.count(1)
        self._meter = ThroughputMeter()
        self._totals = _Totals()
        self._recent: deque[CompletedRequest] = deque(maxlen=_RECENT)
        self._monitor = Monitor(str(self.id), self.snapshot, self._change_key, lambda: self._closed)
        self._thread = threading.Thread(
            target=self._run, name=f"nbollama-engine-{self.id}", daemon=True
        )
        self._calibrated = threading.Event()
        self._thread.start()
        if self._controller is not None:
            self._calibrated.wait()  # engine.parallel is the controller's first choice once load returns
        _live_engines.add(self)

    def spawn(
        self,
        *,
        parallel: int | Literal["adaptive"],
        ctx: int | None = None,
        n_batch: int | None = None,
        max_queue: int | None = None,
        **modes: Any,
    ) -> Engine:
        """A new engine on the SAME loaded weights with its own context and slots.

        The model file is not read again; this engine keeps running. Used by
        the parallelism sweep, which tries several ``parallel`` values in turn.
        ``modes`` (``prefix_cache``, ``reproducible``, and with
        ``parallel="adaptive"`` its ``max_parallel``, ``min_tps``, ``max_ttft``)
        default to this engine's, adaptive targets excepted.
        """
        self._check_open()
        inherited = {
            "prefix_cache": self._config.prefix_cache,
            "reproducible": self._config.reproducible,
        }
        options = LoadOptions.check(
            parallel=parallel,
            ctx=self._config.ctx_per_slot if ctx is None else ctx,
            n_batch=self._config.n_batch if n_batch is None else n_batch,
            max_queue=self._config.max_queue if max_queue is None else max_queue,
            flash_attn="auto" if self._config.flash_attn is None else self._config.flash_attn,
            kv_unified=self._config.kv_unified,
            **{**inherited, **modes},
        )
        return self._on_weights(
            self._weights, options, time.perf_counter(), threads=self._config.threads
        )

    # -- what it is ------------------------------------------------------------------

    @property
    def parallel(self) -> int:
        """The number of slots taking requests now (adaptive parallelism moves it)."""
        return self._controller.active if self._controller is not None else self._config.parallel

    @property
    def parallel_max(self) -> int:
        """The slots whose KV is reserved: ``parallel`` unless adaptive."""
        return self._config.parallel

    @property
    def parallel_reason(self) -> str:
        """Why ``parallel`` is what it is (adaptive: the reason for the last change)."""
        return (
            self._controller.reason
            if self._controller is not None
            else self._config.parallel_reason
        )

    @property
    def parallel_history(self) -> list[ParallelChange]:
        """Adaptive parallelism's recent changes, oldest first (empty otherwise)."""
        with self._lock:
            return list(self._parallel_history)

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
        return self._runner.context.kv_bytes or self.kv_estimate_bytes

    @property
    def kv_estimate_bytes(self) -> int:
        return self._model.kv_geometry.bytes_per_token * self._runner.context.n_seq * self.ctx

    @property
    def kv_estimate(self) -> str:
        per_token = self._model.kv_geometry.bytes_per_token
        streams = self._runner.context.n_seq
        spares = streams - self.parallel_max
        who = f"{self.parallel_max} slots" + (
            f" + {spares} spare (reproducible mode pads to {streams})" if spares else ""
        )
        return (
            f"{who} x {self.ctx} ctx x {format_bytes(per_token)}/token "
            f"= {format_bytes(per_token * streams * self.ctx)} at most"
        )

    @property
    def load_seconds(self) -> float:
        return self._config.load_seconds

    @property
    def reproducible(self) -> bool:
        """Whether a request's tokens are independent of what else runs (``Engine.load(reproducible=True)``)."""
        return self._config.reproducible

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def summary(self) -> str:
        """The one line that says what was loaded and why parallel is what it is."""
        return (
            f"nbollama: model={self.model_name} parallel={self.parallel} ctx/slot={self.ctx} "
            f"kv={format_bytes(self.kv_bytes)} n_batch={self.n_batch} threads={self.threads} "
            f"gpu_layers={self.gpu_layers}{' reproducible' if self.reproducible else ''} "
            f"load={self.load_seconds:.1f}s ({self.parallel_reason})"
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

    def submit(self, prompt: str, **params: Any) -> Handle:
        """Queue one prompt; returns at once with a ``Handle``.

        Parameters (all optional): ``max_tokens=256, temperature=0.8, top_k=40,
        top_p=0.95, min_p=0.05, repeat_penalty=1.0, repeat_last_n=64, seed=None,
        stop=(), priority=0, chat=False, system=None``. Raises
        ``QueueFullError`` when the queue is full and ``InvalidParamsError`` for
        bad parameters. A prompt too long for a slot does not raise: its
        handle finishes at once with ``finish_reason="error"``.
        """
        return self.submit_many([prompt], **params)[0]

    def submit_many(self, prompts: Iterable[str], **params: Any) -> list[Handle]:
        """Queue several prompts in ONE step, all or none; handles in input order.

        The engine's next admission sees them together, so the same prompts at
        the same ``parallel`` form the same batches every time: a cell run
        twice gives the same greedy texts. Parameters as for ``submit``.
        """
        if isinstance(prompts, str):
            raise InvalidParamsError(
                "submit_many() takes a list of prompts; for one prompt use submit()"
            )
        self._check_open()
        sampling, options = check_request_params(params)
        requests = [self._prepare(prompt, sampling, options) for prompt in prompts]
        release_openmp_threads()  # this thread's idle OpenMP team would slow the engine's decodes
        runnable = [r for r in requests if not r.handle.done()]
        with self._lock:
            self._check_open()
            self._scheduler.push_all(runnable)
            for request in runnable:
                self._requests[request.handle.id] = request
            self._totals.submitted += len(requests)
            self._totals.errors += len(requests) - len(runnable)
            self._seq += 1
            self._wakeup.notify()
        return [r.handle for r in requests]

    def _prepare(self, prompt: str, sampling: SamplingParams, options: dict[str, Any]) -> Request:
        """Tokenize in the caller's thread; a prompt that cannot run is finished here."""
        if not isinstance(prompt, str):
            raise InvalidParamsError(f"prompt must be a str, got {type(prompt).__name__}")
        with self._weights.borrowed() as model:
            text = prompt
            if options["chat"]:
                messages = ([("system", options["system"])] if options["system"] else []) + [
                    ("user", prompt)
                ]
                try:
                    text = model.apply_chat_template(messages)
                except ValueError as exc:
                    raise InvalidParamsError(str(exc)) from None
            tokens = np.asarray(model.tokenize(text), dtype=np.int32)
        handle = Handle(
            next(self._request_ids), prompt, len(tokens), sampling.max_tokens, self._cancel
        )
        request = Request(
            handle=handle,
            tokens=tokens,
            params=sampling,
            priority=options["priority"],
            preview=" ".join(prompt.split())[:_PREVIEW_CHARS],
        )
        if len(tokens) == 0:
            handle._finish(
                "error",
                error="the prompt is empty (no tokens)",
                exception=InvalidParamsError("empty prompt"),
            )
        elif len(tokens) >= self.ctx:
            message = (
                f"the prompt is {len(tokens)} tokens but one slot holds {self.ctx} (ctx per slot); "
                f"shorten it or load with a larger ctx (e.g. ctx={_next_pow2(len(tokens) + sampling.max_tokens)})"
            )
            handle._finish("error", error=message, exception=PromptTooLongError(message))
        return request

    def generate(
        self, prompts: str | Iterable[str], *, progress: bool = False, **params: Any
    ) -> list[Result]:
        """Generate for any number of prompts and wait; results come in input order.

        The prompts are fed into the queue as it drains (at most
        ``max(4 x parallel, 64)`` of them inside the engine, never more than
        ``max_queue``), in big chunks, so a greedy call gives the same texts as
        one ``submit_many`` of them all. ``progress=True`` shows a progress bar
        (a live display in a notebook, a line on stderr elsewhere). Ctrl-C
        cancels what has not finished and raises ``KeyboardInterrupt``, whose
        ``.results`` holds every prompt's ``Result`` (finished ones whole).
        """
        if threading.current_thread() is self._thread:
            raise EngineError(
                "generate() cannot wait from the engine's own thread (a done-callback); use submit()"
            )
        from .._feed import feed_generate, window_of

        window = window_of(self)
        return feed_generate(self.submit_many, prompts, params, window=window, progress=progress)

    async def agenerate(
        self, prompts: str | Iterable[str], *, progress: bool = False, **params: Any
    ) -> list[Result]:
        """``generate`` for event loops (asyncio, trio, anyio); cancelling the task cancels the requests."""
        from .._feed import feed_agenerate, window_of

        window = window_of(self)
        return await feed_agenerate(
            self.submit_many, prompts, params, window=window, progress=progress
        )

    # -- cancelling -----------------------------------------------------------------

    def _cancel(self, handle: Handle) -> None:
        with self._lock:
            request = self._requests.get(handle.id)
            if request is None:
                return
            queued = self._scheduler.queue.remove(request)
            if queued:
                self._requests.pop(handle.id, None)
                self._totals.cancelled += 1
                self._seq += 1
            else:
                request.cancel_requested = True
                self._wakeup.notify()
        if queued:
            handle._finish("cancelled")

    def cancel_slot(self, slot: int) -> int | None:
        """Cancel whatever the slot is serving; the request id, or None if it was idle."""
        if not isinstance(slot, int) or not 0 <= slot < self.parallel_max:
            raise ValueError(
                f"slot {slot!r} does not exist (this engine has slots 0..{self.parallel_max - 1})"
            )
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

    # -- the loop (engine thread): schedule, run, postprocess --------------------------

    def _calibrate(self) -> None:
        """Time a few decode steps for adaptive parallelism, on this (the engine's) thread.

        Only the engine's thread decodes: a decode on another thread while the
        engine's OpenMP team exists measured 10-200x slower, so timings taken
        there would say nothing about the engine.
        """
        try:
            if self._controller is None:
                return
            self._runner.time_decode(self.parallel_max)  # warm-up: the first decode allocates
            timings = [
                (rows, self._runner.time_decode(rows)) for rows in _calibration_rows(self.parallel_max)
            ]
            self._controller.calibrate(timings)
        except Exception:  # the controller then starts from its default and learns as it runs
            logger.warning("nbollama: timing decode steps for adaptive parallelism failed", exc_info=True)
        finally:
            self._calibrated.set()

    def _run(self) -> None:
        self._calibrate()
        try:
            while True:
                with self._lock:
                    if not self._has_work():
                        release_openmp_threads()  # an idle engine must not slow a busy one
                    while not self._closing and not self._has_work():
                        self._wakeup.wait()
                    if self._closing:
                        break
                    cancelled = [
                        s
                        for s in self._slots
                        if s.request is not None and s.request.cancel_requested
                    ]
                    admitted = self._scheduler.admit(self._slots, limit=self.parallel)
                    if admitted:
                        self._seq += 1
                for slot in cancelled:
                    self._finish(slot, "cancelled")
                for slot, request in admitted:
                    self._start(slot, request)
                if any(s.busy for s in self._slots):
                    self._step()
                if self._controller is not None:
                    self._adapt()
        except BaseException as exc:  # a bug or a fatal llama.cpp error: fail loudly, not silently
            self._fatal = f"{type(exc).__name__}: {exc}"
            logger.exception("nbollama: the engine loop stopped")
        finally:
            self._shut_down()

    def _has_work(self) -> bool:
        return bool(self._scheduler.queue) or any(s.busy for s in self._slots)

    def _start(self, slot: Slot, request: Request) -> None:
        """Give an admitted request its sampler, text stream and sequence (outside the lock).

        The slot's KV keeps the cached tokens the scheduler chose to reuse; a
        ready shared prefix is copied in from its source slot now.
        """
        try:
            request.sampler = self._runner.sampler_for(request.params, request.tokens)
            request.text = TextStream(request.params.stop)
            self._runner.keep_prefix(slot.id, request.n_prefilled)
            if request.copy_from is not None and request.copy_from.ready:
                self._copy_prefix(slot, request)
        except (
            Exception
        ) as exc:  # e.g. a sampler llama.cpp refused: fail this request, not the loop
            self._finish(slot, "error", error=f"could not start the request: {exc}")
            return
        with self._lock:
            self._totals.prompt_tokens += request.n_prefilled
            self._totals.cached_tokens += request.n_prefilled
        request.handle.cached_tokens = request.cached_tokens
        request.handle.timing.started = time.perf_counter()
        request.handle._set_running(slot.id, "prefill")

    def _copy_prefix(self, slot: Slot, request: Request) -> None:
        """Take the shared prefix from the source slot instead of prefilling it."""
        source = request.copy_from
        assert source is not None
        self._runner.copy_prefix(source.slot, slot.id, source.tokens)
        request.copy_from = None
        request.n_prefilled = request.cached_tokens = source.tokens
        slot.n_past = source.tokens
        self._shared_prefills += 1

    def _resolve_copies(self) -> None:
        """Copy shared prefixes whose source has prefilled them; give up on sources that never will."""
        for slot in self._slots:
            request = slot.request
            if request is None or request.copy_from is None:
                continue
            source = self._slots[request.copy_from.slot]
            wanted = request.copy_from.tokens
            if common_prefix(request.tokens, source.sequence_tokens()) < wanted:
                request.copy_from = None  # the source moved on (or failed): prefill it here
                continue
            if source.n_past >= wanted:
                self._copy_prefix(slot, request)
                request.handle.cached_tokens = request.cached_tokens
                with self._lock:
                    self._totals.prompt_tokens += wanted
                    self._totals.cached_tokens += wanted

    def _step(self) -> None:
        """One ``llama_decode`` for every busy slot: plan, run, then take the tokens."""
        while True:
            plan = plan_step(self._slots, self._config.n_batch, chunk_size=self._chunk_size)
            if plan.empty:
                return
            requests = {i: self._slots[i].request for i in plan.slots}
            started = time.perf_counter()
            outcome = self._runner.run(plan, requests)  # type: ignore[arg-type]
            if outcome.status == DECODE_OK:
                if self._controller is not None:
                    seconds = time.perf_counter() - started
                    self._controller.step(
                        time.monotonic(), len(plan.decodes), seconds, not plan.chunks
                    )
                break
            if outcome.status == DECODE_NO_KV_SLOT:
                if self._evict_caches():
                    continue  # cached prefixes go before any request fails
                victim = self._scheduler.victim(self._slots)
                if victim is None:
                    return
                self._finish(
                    victim,
                    "error",
                    error="the KV cache has no room left for this sequence (llama_decode returned 1)",
                )
                continue  # the others go on without it
            for slot in outcome.plan.slots:
                self._finish(
                    self._slots[slot],
                    "error",
                    error=f"llama_decode failed with status {outcome.status}; this request was dropped, the others go on",
                )
            return
        self._postprocess(outcome)

    def _adapt(self) -> None:
        """Let the controller move the number of slots that take requests (never cancelling any)."""
        assert self._controller is not None
        with self._lock:
            queued = len(self._scheduler.queue)
        generating = sum(1 for s in self._slots if s.state == "generating")
        decision = self._controller.decide(time.monotonic(), queued, generating)
        if decision is not None:
            with self._lock:
                self._parallel_history.append(
                    ParallelChange(
                        time=time.time(), parallel=decision.parallel, reason=decision.reason
                    )
                )
                self._seq += 1
                self._wakeup.notify()  # more slots may take queued requests now

    def _evict_caches(self) -> bool:
        """Free the cells idle slots keep as prefix cache (only a unified KV buffer shares them)."""
        if not self._config.kv_unified:
            return False
        evicted = False
        for slot in self._slots:
            if not slot.busy and len(slot.cache):
                self._runner.reset_sequence(slot.id)
                with self._lock:
                    slot.forget()
                evicted = True
        return evicted

    def _postprocess(self, outcome: StepOutcome) -> None:
        now = time.perf_counter()
        plan = outcome.plan
        for d in plan.decodes:
            self._slots[d.slot].n_past += 1
        prompt_tokens = 0
        for c in plan.chunks:
            slot = self._slots[c.slot]
            slot.request.n_prefilled += c.count  # type: ignore[union-attr]
            slot.n_past += c.count
            prompt_tokens += c.count
        if any(s.request is not None and s.request.copy_from is not None for s in self._slots):
            self._resolve_copies()  # before any token can finish a source slot
        produced = 0
        for slot_id, token in outcome.tokens.items():
            slot = self._slots[slot_id]
            try:
                produced += self._accept(slot, token, now)
            except Exception as exc:  # this slot's token handling failed: end this request alone
                logger.warning(
                    "nbollama: request in slot %s failed while handling its token",
                    slot_id,
                    exc_info=True,
                )
                self._finish(
                    slot, "error", error=f"handling its token failed: {type(exc).__name__}: {exc}"
                )
        for slot_id, why in outcome.failures.items():
            self._finish(self._slots[slot_id], "error", error=why)
        self._meter.add(produced)
        with self._lock:
            self._totals.prompt_tokens += prompt_tokens
            self._totals.generated_tokens += produced
            self._seq += 1

    def _accept(self, slot: Slot, token: int, now: float) -> int:
        """Take a sampled token: stream its text or finish the request. Returns tokens produced."""
        request = slot.request
        assert request is not None and request.text is not None
        handle = request.handle
        if handle.timing.first_token is None:
            handle.timing.first_token = now
            if self._controller is not None:
                self._controller.first_token(now - handle.timing.submitted)
        if self._model.is_eog(token):
            self._finish(slot, "stop")
            return 0
        request.completion_tokens += 1
        request.output_ids.append(token)
        handle._publish(request.text.feed(self._model.piece(token)), request.completion_tokens)
        if request.text.stopped:
            self._finish(slot, "stop")
        elif request.completion_tokens >= request.params.max_tokens or slot.n_past >= self.ctx:
            self._finish(slot, "length")  # its budget, or the slot's context, is used up
        else:
            slot.last_token = token
            if slot.state != "generating":
                with self._lock:
                    slot.state = "generating"
        return 1

    def _finish(self, slot: Slot, reason: FinishReason, *, error: str | None = None) -> None:
        """End the slot's request: its result, its slot freed, the books kept."""
        request = slot.request
        if request is None:
            return
        tail = ""
        if request.text is not None:
            try:
                tail = request.text.finish()
            except Exception:  # a broken stream must not keep the slot
                logger.debug(
                    "nbollama: flushing the text of request %s failed",
                    request.handle.id,
                    exc_info=True,
                )
        if request.sampler is not None:
            request.sampler.free()
            request.sampler = None
        keep_cache = (
            self._config.prefix_cache and reason != "error"
        )  # a failed request's KV is not trusted
        prompt_only = (
            self._config.reproducible
        )  # generated tokens' KV came from decode rows, not prompt chunks
        if not keep_cache:
            self._runner.reset_sequence(slot.id)
        elif prompt_only:
            self._runner.keep_prefix(slot.id, request.n_prefilled)
        with self._lock:
            slot.release(reason, keep_cache=keep_cache, prompt_only=prompt_only)
            self._requests.pop(request.handle.id, None)
            if reason in ("stop", "length"):
                self._totals.completed += 1
            elif reason == "cancelled":
                self._totals.cancelled += 1
            else:
                self._totals.errors += 1
            self._seq += 1
        if any(s.request is not None and s.request.copy_from is not None for s in self._slots):
            self._resolve_copies()  # requests waiting on this slot copy now, or prefill themselves
        exception: NbollamaError | None = (
            EngineError(error) if reason == "error" and error else None
        )
        result = request.handle._finish(
            reason, tail=tail, error=error, exception=exception, token_ids=tuple(request.output_ids)
        )
        self._recent.append(completed_request(result))

    def _shut_down(self) -> None:
        """The loop's last act: fail or cancel whatever is still queued or running."""
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
            self._scheduler.queue.drain()
            leftovers = list(self._requests.values())
            self._requests.clear()
        for request in leftovers:  # queued, or taken from the queue when the loop stopped
            if request.sampler is not None:
                request.sampler.free()
                request.sampler = None
            request.handle._finish(reason, error=message)

    # -- looking at it ---------------------------------------------------------------

    def snapshot(self) -> EngineSnapshot:
        """Plain, JSON-ready data for views: slots, queue, throughput, KV, memory."""
        now_mono = time.monotonic()
        now_perf = time.perf_counter()
        with self._lock:
            slots = [s.snapshot(now_mono, now_perf) for s in self._slots]
            queue_length = len(self._scheduler.queue)
            totals = self._totals.as_dict()
            seq = self._seq
            recent_done = list(self._recent)[-16:]
            history = list(self._parallel_history)
        prompt_total = totals["prompt_tokens"]
        return EngineSnapshot(
            v=SNAPSHOT_VERSION,
            time=time.time(),
            seq=seq,
            closed=self._closed,
            kind="local",
            endpoint=None,
            model={
                "name": self._model.name,
                "path": str(self._config.model_path),
                "arch": self._model.arch,
                "size_bytes": self._model.size_bytes,
                "n_params": self._model.n_params,
            },
            parallel=self.parallel,
            parallel_max=self.parallel_max,
            reproducible=self._config.reproducible,
            ctx_per_slot=self.ctx,
            n_batch=self.n_batch,
            gpu_layers=self.gpu_layers,
            parallel_reason=self.parallel_reason,
            slots=slots,
            queue={"length": queue_length, "max": self._scheduler.queue.max_size},
            throughput=round(self._meter.rate(), 2),
            throughput_window=self._meter.window,
            busy_slots=sum(1 for s in slots if s["state"] != "idle"),
            kv={
                "used": sum(s["kv_used"] for s in slots),
                "total": self.parallel_max * self.ctx,
                "bytes": self.kv_bytes,
            },
            memory=_memory.memory_figures(self.kv_bytes, self.kv_estimate),
            totals=totals,  # type: ignore[typeddict-item]
            recent=recent_done,
            prefix_cache={
                "enabled": self._config.prefix_cache,
                "hit_rate": round(totals["cached_tokens"] / prompt_total, 4)
                if prompt_total
                else 0.0,
                "shared_prefills": self._shared_prefills,
            },
            adaptive=None
            if self._controller is None
            else {"target": str(self._controller.target), "history": history},
        )

    def subscribe(
        self, callback: Callable[[EngineSnapshot], object], *, interval: float = 0.25
    ) -> Subscription:
        """Call ``callback(snapshot)`` from a background thread when something changed,
        at most once per ``interval`` seconds (4 Hz by default)."""
        return self._monitor.subscribe(callback, interval)

    def _change_key(self) -> Hashable:
        """Cheap: what makes a new snapshot worth sending (state, throughput, an expiring badge)."""
        now = time.monotonic()
        badges = sum(
            1
            for s in self._slots
            if s.request is None
            and s.last_request_id is not None
            and now - s.last_finished < BADGE_SECONDS
        )
        return (self._seq, round(self._meter.rate(), 1), badges, self._closed)

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
            raise EngineError(
                "close() cannot be called from the engine's own thread (a done-callback)"
            )
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
                self._closed = True
                self._seq += 1
            self._monitor.stop()  # one last snapshot, with closed=True
        finally:
            self._closed = True
            self._runner.close()
            self._weights.release()
            _live_engines.discard(self)
            self._close_done.set()


def _calibration_rows(max_parallel: int) -> list[int]:
    """Decode steps adaptive parallelism times at load: 1 row and every slot, 3 each."""
    return [rows for rows in sorted({1, max_parallel}) for _ in range(3)]


def _next_pow2(n: int) -> int:
    return 1 << max(5, (n - 1).bit_length())
