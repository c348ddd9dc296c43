"""What an engine is loaded with: checked arguments, the parallel rule, and shared weights.

Everything here runs before any model is read, so a bad argument costs
nothing; ``LoadOptions.check`` is what ``Engine.load``, ``nbollama.load`` and
``%nbollama load`` all call first.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .. import memory as _memory
from .._api.kvcache import check_kv_types
from .._api.queue import DEFAULT_MAX_QUEUE, MAX_QUEUE_ENV, resolve_max_queue
from .._api.queue import whole_number as _whole
from ..exceptions import EngineClosedError, InvalidParamsError
from ._adaptive import Target
from ._kvprobe import KVCacheType, kv_bytes_per_slot
from ._llama import LlamaModel
from ._prompt_cache import DEFAULT_CACHE_RAM_MIB

__all__ = [
    "DEFAULT_MAX_QUEUE",
    "MAX_QUEUE_ENV",
    "NUM_PARALLEL_ENV",
    "LoadOptions",
    "EngineConfig",
    "Weights",
    "choose_parallel",
]

NUM_PARALLEL_ENV = "NBOLLAMA_NUM_PARALLEL"
#: The reason when the user chose parallel: said once, not as "why parallel=4: parallel=4 as asked".
AS_ASKED = "as asked"
#: parallel="adaptive" without max_parallel reserves this many slots.
DEFAULT_MAX_PARALLEL = 8


@dataclass(frozen=True)
class LoadOptions:
    """Load arguments, checked; ``check`` raises ``InvalidParamsError`` naming the bad one."""

    parallel: int | Literal["auto", "adaptive"] = "auto"
    ctx: int = 2048
    n_batch: int = 512
    gpu_layers: int | Literal["auto"] = "auto"
    threads: int | None = None
    max_queue: int | None = None
    flash_attn: bool | Literal["auto"] = "auto"
    kv_type: str = "f16"  # K, and V unless kv_type_v says otherwise
    kv_type_v: str | None = None
    kv_unified: bool = False
    prefix_cache: bool = True
    reproducible: bool = False
    max_parallel: int | None = None  # adaptive: the slots whose KV is reserved
    min_tps: float | None = None  # adaptive: each running request keeps at least this many tokens/s
    max_ttft: float | None = (
        None  # adaptive: time to first token (queue wait included) stays under this
    )
    jump_forward: bool = True  # a format's forced tokens are decoded as one chunk, not sampled
    cache_ram: int = DEFAULT_CACHE_RAM_MIB  # MiB of host RAM for prompts evicted from slots; 0: none

    @classmethod
    def check(cls, **options: Any) -> LoadOptions:  # any values: checked below
        known = set(cls.__dataclass_fields__)
        unknown = set(options) - known
        if unknown:
            raise InvalidParamsError(
                f"unknown load option(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        loaded = cls(**options)
        if loaded.parallel not in ("auto", "adaptive"):
            _whole(
                "parallel", loaded.parallel, 1, "must be 'auto', 'adaptive' or a whole number >= 1"
            )
        if loaded.parallel == "adaptive":
            if loaded.max_parallel is not None:
                _whole("max_parallel", loaded.max_parallel, 1, "must be a whole number >= 1")
            Target(loaded.min_tps, loaded.max_ttft)  # checks the values, and that only one is given
        else:
            given = [
                n for n in ("max_parallel", "min_tps", "max_ttft") if getattr(loaded, n) is not None
            ]
            if given:
                raise InvalidParamsError(f"{', '.join(given)} only apply with parallel='adaptive'")
        _whole("ctx", loaded.ctx, 32, "the context of one slot must be a whole number >= 32 tokens")
        _whole("n_batch", loaded.n_batch, 1, "must be a whole number >= 1")
        _whole("cache_ram", loaded.cache_ram, 0, "MiB of host RAM for saved prompts: a whole number >= 0")
        if loaded.gpu_layers != "auto":
            _whole(
                "gpu_layers",
                loaded.gpu_layers,
                -1,
                "must be 'auto', -1 (all) or a whole number >= 0",
            )
        if loaded.threads is not None:
            _whole("threads", loaded.threads, 1, "must be a whole number >= 1")
        resolve_max_queue(loaded.max_queue)
        if loaded.flash_attn not in ("auto", True, False):
            raise InvalidParamsError(
                f"flash_attn={loaded.flash_attn!r}: must be 'auto', True or False"
            )
        check_kv_types(loaded.kv_type, loaded.kv_type_v, loaded.flash_attn)
        for name in ("kv_unified", "prefix_cache", "reproducible", "jump_forward"):
            if not isinstance(getattr(loaded, name), bool):
                raise InvalidParamsError(f"{name}={getattr(loaded, name)!r}: must be True or False")
        if loaded.reproducible and loaded.kv_unified:
            raise InvalidParamsError(
                "reproducible=True needs a KV stream per slot (kv_unified=False): in a unified buffer a "
                "token's cells depend on what else is cached, and so does the order attention adds them in"
            )
        return loaded

    def layers(self, gpu_offload: bool) -> int:
        """The ``n_gpu_layers`` llama.cpp gets: all when 'auto' and a GPU backend exists, else as given."""
        if self.gpu_layers == "auto":
            return -1 if gpu_offload else 0
        return int(self.gpu_layers)


@dataclass
class EngineConfig:
    """What one engine runs with, resolved from ``LoadOptions`` and the loaded model."""

    model_path: Path
    parallel: int
    ctx_per_slot: int
    n_batch: int
    threads: int
    gpu_layers: int
    max_queue: int
    parallel_reason: str
    flash_attn: bool | None = None
    type_k: str = "f16"
    type_v: str = "f16"
    kv_unified: bool = False
    prefix_cache: bool = True
    reproducible: bool = False
    adaptive: Target | None = None  # parallel="adaptive": what the controller aims at
    load_seconds: float = 0.0
    jump_forward: bool = True
    cache_ram: int = DEFAULT_CACHE_RAM_MIB

    @classmethod
    def resolve(
        cls, model: LlamaModel, options: LoadOptions, *, threads: int | None = None
    ) -> EngineConfig:
        type_k, type_v = check_kv_types(options.kv_type, options.kv_type_v, options.flash_attn)
        flash_attn = None if options.flash_attn == "auto" else bool(options.flash_attn)
        parallel, reason = choose_parallel(
            model,
            options.parallel,
            options.ctx,
            options.n_batch,
            options.max_parallel,
            kv=KVCacheType(type_k, type_v, flash_attn),
        )
        return cls(
            model_path=model.path,
            parallel=parallel,
            ctx_per_slot=options.ctx,
            n_batch=options.n_batch,
            threads=threads or options.threads or max(1, os.cpu_count() or 1),
            gpu_layers=model.gpu_layers,
            max_queue=resolve_max_queue(options.max_queue),
            parallel_reason=reason,
            flash_attn=flash_attn,
            type_k=type_k,
            type_v=type_v,
            kv_unified=options.kv_unified,
            prefix_cache=options.prefix_cache,
            reproducible=options.reproducible,
            adaptive=Target(options.min_tps, options.max_ttft)
            if options.parallel == "adaptive"
            else None,
            jump_forward=options.jump_forward,
            cache_ram=options.cache_ram,
        )


def choose_parallel(
    model: LlamaModel,
    parallel: int | Literal["auto", "adaptive"],
    ctx: int,
    n_batch: int,
    max_parallel: int | None = None,
    *,
    kv: KVCacheType | None = None,
) -> tuple[int, str]:
    """The number of slots and why: 1 for recurrent models, the memory rule for 'auto', else as asked.

    'auto', and 'adaptive' without ``max_parallel``, count slots of the KV
    type asked for: a q8_0 slot costs about half an f16 one, so more fit.
    """
    if model.is_recurrent or model.is_hybrid:
        kind = "recurrent" if model.is_recurrent else "hybrid"
        reason = (
            f"parallel=1: {model.arch} is a {kind} architecture, whose per-sequence state "
            "llama.cpp cannot batch like a KV cache"
        )
        if parallel != 1:
            warnings.warn(f"nbollama: {reason}", RuntimeWarning, stacklevel=4)
        return 1, reason
    if parallel == "adaptive" and max_parallel is not None:
        return max_parallel, f"adaptive: up to {max_parallel} slots, moved while it runs"
    if parallel not in ("auto", "adaptive"):
        return int(parallel), AS_ASKED
    kv = kv or KVCacheType()
    per_slot = kv_bytes_per_slot(model, kv, ctx)
    # compute + output buffers: logits rows for every slot and the batch's activations
    most = DEFAULT_MAX_PARALLEL if parallel == "adaptive" else _memory.AUTO_PARALLEL
    shared = model.n_vocab * 4 * most + n_batch * model.n_embd * 4 * 16
    choice = _memory.choose_parallel(
        per_slot,
        shared,
        on_gpu=model.gpu_layers != 0,
        env_value=None if parallel == "adaptive" else os.environ.get(NUM_PARALLEL_ENV),
        most=most,
        kv_type=kv.label,
    )
    if parallel == "adaptive":
        return choice.parallel, f"adaptive: up to {choice.parallel} slots, moved while it runs ({choice.reason})"
    return choice.parallel, choice.reason


class Weights:
    """A loaded model shared by several engines (the sweep makes one context per parallel value).

    The model is freed when the last engine (or borrower) releases it.
    """

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self._refs = 0
        self._lock = threading.Lock()

    def acquire(self) -> Weights:
        with self._lock:
            if self._refs == 0 and self.model._closed:
                raise EngineClosedError(
                    "the model was closed with the last engine that used it; load it again"
                )
            self._refs += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self.model.close()

    @contextmanager
    def borrowed(self) -> Iterator[LlamaModel]:
        """Keep the model alive while a caller's thread uses it (tokenizing), even if close() runs meanwhile."""
        self.acquire()
        try:
            yield self.model
        finally:
            self.release()
