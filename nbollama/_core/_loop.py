"""The engine's loop, on its own thread: schedule, run, postprocess (nano-vllm's step).

Each turn admits queued requests into free slots, plans one step (a token for
every generating slot, prompt chunks for prefilling ones), runs it in ONE
``llama_decode`` through the ``ModelRunner``, and takes the sampled tokens:
text, stop strings, finishing. Where a format forces the tokens after a
sampled one, they ride in the slot's next batch entry (jump-forward, see
``_jump``) and are taken once decoded. A failure in one slot ends that slot's
request alone, as llama-server releases only the failed slot.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from .._api.base import error_of
from .._api.requests import FinishReason
from .._api.snapshot import ParallelChange, completed_request
from .._logging import logger
from ..exceptions import ContextError
from ._adaptive import ParallelController
from ._intake import StepIntake
from ._llama import DECODE_NO_KV_SLOT, DECODE_OK, LlamaModel, release_openmp_threads
from ._outputs import outputs_of
from ._prefix import common_prefix
from ._runner import ModelRunner
from ._scheduler import Scheduler, plan_step
from ._slots import Request, Slot
from ._text import TextStream

if TYPE_CHECKING:
    from ._config import EngineConfig

__all__ = ["EngineLoop"]


class EngineLoop(StepIntake):
    """The loop half of ``Engine``: what runs on the engine's thread (and ``_finish``, which
    also ends requests at shutdown). ``Engine`` sets the state declared here."""

    _wakeup: threading.Condition
    _calibrated: threading.Event
    _fatal: str | None
    _config: EngineConfig
    _model: LlamaModel
    _runner: ModelRunner
    _scheduler: Scheduler
    _slots: list[Slot]
    _requests: dict[int, Request]
    _controller: ParallelController | None
    _parallel_history: deque[ParallelChange]
    _shared_prefills: int
    _chunk_size: int | None

    if TYPE_CHECKING:  # defined by Engine

        @property
        def parallel(self) -> int: ...
        @property
        def parallel_max(self) -> int: ...
        @property
        def ctx(self) -> int: ...

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
                (rows, self._runner.time_decode(rows))
                for rows in _calibration_rows(self.parallel_max)
            ]
            self._controller.calibrate(timings)
        except Exception:  # the controller then starts from its default and learns as it runs
            logger.warning(
                "nbollama: timing decode steps for adaptive parallelism failed", exc_info=True
            )
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
            if request.choice is None:  # a choice is scored, not sampled
                request.sampler = self._runner.sampler_for(request.params, request.tokens)
            request.text = TextStream(request.params.stop)
            if request.matcher is not None and self._config.jump_forward:
                # the format's first tokens, when it forces them: decoded after the prompt
                room = self._forced_room(request, at=len(request.tokens))
                request.start_forced = tuple(self._take_forced(request, room))
            self._swap_saved(slot, request)
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

    def _swap_saved(self, slot: Slot, request: Request) -> None:
        """The prompt cache in host RAM: save what the slot held before it is cut, then write in
        the saved prompt the scheduler picked (a refused one is prefilled instead)."""
        saved = self._scheduler.saved
        evicts, request.evicts = request.evicts, None
        if evicts is not None and saved.worth_saving(evicts):
            try:
                saved.add(evicts, self._runner.save_sequence(slot.id))
            except (ContextError, MemoryError) as exc:  # not kept: the request runs all the same
                logger.debug("nbollama: slot %s's prompt was not kept in RAM: %s", slot.id, exc)
        if request.restore is None:
            return
        entry, request.restore = request.restore[0], None
        if not self._runner.restore_sequence(slot.id, entry.state):
            request.n_prefilled = request.cached_tokens = slot.n_past = 0

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
            requests: dict[int, Request] = {}
            for i in plan.slots:
                request = self._slots[i].request
                assert request is not None  # plan_step plans only slots that serve a request
                requests[i] = request
            started = time.perf_counter()
            outcome = self._runner.run(plan, requests)
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

    def _finish(
        self, slot: Slot, reason: FinishReason, *, error: str | None = None, tail: str = ""
    ) -> None:
        """End the slot's request: its result, its slot freed, the books kept."""
        request = slot.request
        if request is None:
            return
        if request.choice is not None and request.choice.current is not None:
            request.tokens = request.choice.prompt  # the cache keeps the prompt, not an option
        if request.text is not None:
            try:
                tail += request.text.finish()
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
        elif slot.n_past > len(held := slot.held_tokens()):
            self._runner.keep_prefix(slot.id, len(held))  # forced tokens past a stop are not kept
        with self._lock:
            slot.release(reason, keep_cache=keep_cache, prompt_only=prompt_only)
            self._requests.pop(request.handle.id, None)
            self._totals.ended(reason)
            self._seq += 1
        if any(s.request is not None and s.request.copy_from is not None for s in self._slots):
            self._resolve_copies()  # requests waiting on this slot copy now, or prefill themselves
        outputs = outputs_of(request, reason, request.handle.text + tail)
        result = request.handle._finish(
            reason,
            tail=tail,
            error=error,
            exception=error_of(reason, error),
            token_ids=tuple(request.output_ids),
            forced_tokens=request.forced_tokens,
            **outputs,
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
            self._scheduler.saved.clear()  # its RAM goes with the engine, whoever keeps the object
            leftovers = list(self._requests.values())
            self._requests.clear()
        for request in leftovers:  # queued, or taken from the queue when the loop stopped
            if request.sampler is not None:
                request.sampler.free()
                request.sampler = None
            request.handle._finish(reason, error=message)


def _calibration_rows(max_parallel: int) -> list[int]:
    """Decode steps adaptive parallelism times at load: 1 row and every slot, 3 each."""
    return [rows for rows in sorted({1, max_parallel}) for _ in range(3)]
