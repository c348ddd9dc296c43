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

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from .. import memory as _memory
from .._api.base import after_engines_closed, check_slot, prefix_hit_rate, preview_of
from .._api.monitor import Monitor
from .._api.requests import Handle, SamplingParams
from .._api.snapshot import EngineSnapshot, ParallelChange
from .._logging import logger
from ..exceptions import InvalidParamsError, PromptTooLongError
from ..models import GGUFHeader, same_file
from ..sources import locate
from ._adaptive import ParallelController
from ._config import EngineConfig, LoadOptions, Weights
from ._facts import EngineFacts
from ._identity import engine_identity
from ._llama import (
    LlamaContext,
    LlamaModel,
    release_openmp_threads,
    silence_llama_log,
    supports_gpu_offload,
)
from ._loop import EngineLoop
from ._outputs import prepare_output
from ._prompt_cache import DEFAULT_CACHE_RAM_MIB, PromptCache
from ._runner import INVARIANT_ROWS, ModelRunner
from ._scheduler import Scheduler
from ._slots import Request, Slot

__all__ = ["Engine"]

#: Reproducible mode cuts prompts at multiples of this many tokens from position 0,
#: so a prompt's chunks, and the prefixes that can be reused, depend on it alone.
REPRODUCIBLE_CHUNK = 128
_HISTORY = 32  # adaptive parallelism's changes kept for views

after_engines_closed(silence_llama_log)
  # C++ teardown may log after Python is gone


class Engine(EngineFacts, EngineLoop):
    """N parallel slots serving one model, with continuous batching.

    Make one with ``Engine.load(...)``; use it as a context manager or call
    ``close()`` to free the context and the weights.
    """

    _ids = itertools.count(1)

    # -- construction --------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] | GGUFHeader | None = None,
        *,
        parallel: int | Literal["auto", "adaptive"] = "auto",
        ctx: int = 2048,
        n_batch: int = 512,
        gpu_layers: int | Literal["auto"] = "auto",
        threads: int | None = None,
        max_queue: int | None = None,
        flash_attn: bool | Literal["auto"] = "auto",
        kv_type: str = "f16",
        kv_type_v: str | None = None,
        kv_unified: bool = False,
        prefix_cache: bool = True,
        reproducible: bool = False,
        max_parallel: int | None = None,
        min_tps: float | None = None,
        max_ttft: float | None = None,
        share_weights_with: Engine | None = None,
        jump_forward: bool = True,
        cache_ram: int = DEFAULT_CACHE_RAM_MIB,
    ) -> Engine:
        """Load a GGUF model (``None``/``"default"``: the bundled Gemma 3 270M) and start the slots.

        ``ctx`` is the context of ONE slot; the KV cache holds ``parallel x ctx``
        tokens. ``gpu_layers="auto"`` offloads every layer when llama.cpp was
        built with a GPU backend, none otherwise. ``flash_attn`` and
        ``kv_unified`` pass through to llama.cpp (``kv_unified=True`` lets all
        slots share one KV buffer instead of one stream each).
        ``kv_type`` stores the KV cache's K (and V, unless ``kv_type_v`` says
        otherwise) in f16, q8_0 (about half the bytes) or q4_0 (about a
        quarter); a quantised V needs flash attention, so it is refused with
        ``flash_attn=False`` instead of silently staying f16.
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
        ``share_weights_with=other`` borrows an open engine's weights when it
        was loaded from the same file with the same GPU layers, instead of
        reading the file again (the session does this for named engines).
        ``jump_forward=False`` samples every token of a format, also those it
        forces (``True`` decodes them as one chunk without sampling: faster).
        ``cache_ram`` MiB of host RAM keep the KV of prompts whose slot moved
        on, written back when a prompt starts the same way (llama-server's
        ``--cache-ram``; 0 keeps none).
        """
        options = LoadOptions.check(
            parallel=parallel,
            ctx=ctx,
            n_batch=n_batch,
            gpu_layers=gpu_layers,
            threads=threads,
            max_queue=max_queue,
            flash_attn=flash_attn,
            kv_type=kv_type,
            kv_type_v=kv_type_v,
            kv_unified=kv_unified,
            prefix_cache=prefix_cache,
            reproducible=reproducible,
            max_parallel=max_parallel,
            min_tps=min_tps,
            max_ttft=max_ttft,
            jump_forward=jump_forward,
            cache_ram=cache_ram,
        )
        started = time.perf_counter()
        path = locate(model).path  # a GGUFHeader given (the session's) is not read again
        release_openmp_threads()  # see its docstring: an idle team on this thread slows every engine
        layers = options.layers(supports_gpu_offload())
        donor = share_weights_with
        if donor is not None and not donor.closed and donor.gpu_layers == layers and same_file(
            donor.model_path, path
        ):
            weights = donor._weights.acquire()
        else:
            weights = Weights(LlamaModel(path, gpu_layers=layers)).acquire()
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
        super().__init__()
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
                type_k=config.type_k,
                type_v=config.type_v,
            )
        except BaseException:
            self._weights.release()
            raise
        config.ctx_per_slot = context.ctx_per_slot
        self._config = config
        self._runner = ModelRunner(
            self._model,
            context,
            config.n_batch,
            invariant=config.reproducible,
            # greedy slots' masks are filled during the decode where a core is left for it (and in
            # reproducible mode, whose tokens must not depend on the machine's cores)
            greedy_masks_ahead=config.reproducible or (os.cpu_count() or 1) > config.threads,
        )
        self._slots = [Slot(i) for i in range(config.parallel)]
        self._chunk_size = REPRODUCIBLE_CHUNK if config.reproducible else None
        self._scheduler = Scheduler(
            config.max_queue,
            prefix_cache=config.prefix_cache,
            chunk_size=self._chunk_size,
            saved=PromptCache(config.cache_ram if config.prefix_cache else 0),
        )
        self._controller = (
            ParallelController(config.parallel, config.adaptive)
            if config.adaptive is not None
            else None
        )
        self._parallel_history: deque[ParallelChange] = deque(maxlen=_HISTORY)
        self._shared_prefills = 0
        self._requests: dict[int, Request] = {}
        self._identity: str | None = None  # the result store's, made at first use
        self._wakeup = threading.Condition(self._lock)
        self._fatal: str | None = None
        self._monitor = Monitor(str(self.id), self.snapshot, self._change_key, lambda: self._closed)
        self._thread = threading.Thread(
            target=self._run, name=f"nbollama-engine-{self.id}", daemon=True
        )
        self._calibrated = threading.Event()
        self._thread.start()
        if self._controller is not None:
            self._calibrated.wait()  # engine.parallel is the controller's first choice once load returns
        self._track()

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
        ``modes`` (``prefix_cache``, ``reproducible``, ``kv_type``,
        ``kv_type_v``, and with ``parallel="adaptive"`` its ``max_parallel``,
        ``min_tps``, ``max_ttft``) default to this engine's, adaptive targets excepted.
        """
        self._check_open()
        inherited: dict[str, Any] = {
            "prefix_cache": self._config.prefix_cache,
            "reproducible": self._config.reproducible,
            "jump_forward": self._config.jump_forward,
            "cache_ram": self._config.cache_ram,
            "kv_type": self._config.type_k,
            "kv_type_v": self._config.type_v if "kv_type" not in modes else None,
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

    def __enter__(self) -> Engine:
        return self

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        self._check_open()
        with self._weights.borrowed() as model:
            return model.tokenize(text, add_special=add_special)

    # -- submitting -----------------------------------------------------------------

    # -- submitting (``EngineBase.submit_many`` calls these) ------------------------------

    def _prepare(
        self, prompt: str, sampling: SamplingParams, options: dict[str, Any], checked: object
    ) -> Request:
        """Tokenize in the caller's thread; a prompt that cannot run is finished here."""
        with self._weights.borrowed() as model:
            text = prompt
            if options["chat"]:
                messages = ([("system", options["system"])] if options["system"] else []) + [
                    ("user", prompt)
                ]
                text = model.apply_chat_template(messages)
            tokens = np.asarray(model.tokenize(text), dtype=np.int32)
            handle = Handle(
                self._next_request_id(), prompt, len(tokens), sampling.max_tokens, self._cancel
            )
            handle.model = self.name or self.model_name
            request = Request(handle, tokens, sampling, options["priority"], preview_of(prompt))
            try:
                prepare_output(request, text, options["output"], model)
            except InvalidParamsError as exc:  # this prompt cannot run as asked
                handle._finish("error", error=str(exc), exception=exc)
                return request
        if len(tokens) == 0:
            self._fail_empty(handle, "the prompt is empty (no tokens)")
        elif len(tokens) >= self.ctx:
            message = (
                f"the prompt is {len(tokens)} tokens but one slot holds {self.ctx} (ctx per slot); "
                f"shorten it or load with a larger ctx (e.g. ctx={_next_pow2(len(tokens) + sampling.max_tokens)})"
            )
            handle._finish("error", error=message, exception=PromptTooLongError(message))
        return request

    def _store_identity(self) -> str | None:
        if self._identity is None:
            self._identity = engine_identity(self._model, self._config, flash_attn=self.flash_attn)
        return self._identity

    def _store_material(self, request: Request) -> bytes:
        return request.tokens.tobytes()  # after the chat template: another template is another key

    def _replay_is_exact(self) -> bool:
        return self._config.reproducible

    def _store_label(self) -> str:
        return self.model_name

    def _enqueue(self, requests: Sequence[Request]) -> None:
        self._scheduler.push_all(requests)
        for request in requests:
            self._requests[request.handle.id] = request

    def _after_submit(self) -> None:
        release_openmp_threads()  # this thread's idle OpenMP team would slow the engine's decodes
        with self._lock:
            self._wakeup.notify()

    def _live_handles(self) -> list[Handle]:
        return [r.handle for r in self._requests.values()]

    def _window_rows(self) -> int:
        return self.parallel_max  # adaptive: every reserved slot

    def _queue_limit(self) -> int:
        return self._scheduler.queue.max_size

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
        check_slot(slot, self.parallel_max)
        with self._lock:
            request = self._slots[slot].request
        if request is None:
            return None
        request.handle.cancel()
        return request.handle.id

    # -- looking at it ---------------------------------------------------------------

    def snapshot(self) -> EngineSnapshot:
        """Plain, JSON-ready data for views: slots, queue, throughput, KV, memory."""
        now_mono = time.monotonic()
        now_perf = time.perf_counter()
        with self._lock:
            slots = [s.snapshot(now_mono, now_perf) for s in self._slots]
            queue_length = len(self._scheduler.queue)
            books = self._read_books()
            history = list(self._parallel_history)
        saved = self._scheduler.saved  # ints read while the engine's thread may add: a moment old at worst
        return self._snapshot(
            slots=slots,
            queue_length=queue_length,
            books=books,
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
            amx=self.amx,
            kv={
                "used": sum(s["kv_used"] or 0 for s in slots),
                "total": self.parallel_max * self.ctx,
                "bytes": self.kv_bytes,
            },
            memory=_memory.memory_figures(self.kv_bytes, self.kv_estimate, self.kv_type),
            prefix_cache={
                "enabled": self._config.prefix_cache,
                "hit_rate": prefix_hit_rate(books[0]),
                "shared_prefills": self._shared_prefills,
                "ram_prompts": len(saved),
                "ram_bytes": saved.nbytes,
            },
            adaptive=None
            if self._controller is None
            else {"target": str(self._controller.target), "history": history},
        )

    def _badges_showing(self, now: float) -> int:
        return sum(1 for s in self._slots if s.request is None and s.ended and s.ended.showing(now))

    # -- closing --------------------------------------------------------------------

    def _closed_message(self) -> str:
        return (
            f"this engine was closed{'' if not self._fatal else ' after an error: ' + self._fatal}; "
            "load a new one (nbollama.Engine.load or %nbollama load)"
        )

    def _begin_close(self) -> None:
        self._wakeup.notify_all()

    def _stop(self) -> None:
        self._thread.join()

    def _release(self) -> None:
        self._runner.close()
        self._weights.release()


def _next_pow2(n: int) -> int:
    return 1 << max(5, (n - 1).bit_length())
