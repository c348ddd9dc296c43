"""What an in-kernel engine is: its shape, its KV cache, and the one line that says why.

Read-only facts, mixed into ``Engine``: slots and why, context, threads, the
model, the KV cache as llama.cpp allocated it (and in another type, and a
scorer on the same weights), the AMX decision, the load line.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path
from threading import RLock

from .._api.kvcache import check_kv_types, kv_label
from .._api.snapshot import ParallelChange
from ..memory import format_bytes
from ._adaptive import ParallelController
from ._config import EngineConfig, Weights
from ._kvprobe import KVCacheType, Scorer, kv_bytes_per_slot
from ._llama import LlamaModel
from ._runner import ModelRunner

__all__ = ["EngineFacts"]


class EngineFacts:
    """The engine's read-only side; ``Engine`` sets these attributes at construction."""

    _config: EngineConfig
    _model: LlamaModel
    _weights: Weights
    _runner: ModelRunner
    _controller: ParallelController | None
    _parallel_history: deque[ParallelChange]
    _lock: RLock
    _closed: bool
    _check_open: Callable[[], None]

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
        """Tokens one step's batch holds (llama.cpp's n_batch)."""
        return self._config.n_batch

    @property
    def threads(self) -> int:
        """CPU threads of each decode."""
        return self._config.threads

    @property
    def gpu_layers(self) -> int:
        """Layers offloaded to a GPU (0 without one)."""
        return self._config.gpu_layers

    @property
    def model_name(self) -> str:
        """The model's name, from its GGUF metadata."""
        return self._model.name

    @property
    def model_path(self) -> Path:
        """The GGUF file the weights came from."""
        return self._config.model_path

    @property
    def kv_bytes(self) -> int:
        """Size of the KV cache buffers llama.cpp allocated (from its own report)."""
        return self._runner.context.kv_bytes or self.kv_estimate_bytes

    @property
    def kv_estimate_bytes(self) -> int:
        return self._model.kv_geometry.bytes_per_token * self._runner.context.n_seq * self.ctx

    @property
    def kv_type(self) -> str:
        """The KV cache's precision: ``'f16'``, ``'q8_0'``, or ``'K q8_0 / V f16'`` when they differ."""
        return kv_label(self._config.type_k, self._config.type_v)

    @property
    def flash_attn(self) -> bool:
        """Whether llama.cpp runs flash attention (what ``flash_attn="auto"`` became)."""
        return self._runner.context.flash_attn

    def kv_bytes_per_slot(
        self, kv_type: str | None = None, kv_type_v: str | None = None, *, ctx: int | None = None
    ) -> int:
        """One slot's KV bytes in a type (default: this engine's) at ``ctx`` tokens, as llama.cpp allocates them."""
        self._check_open()
        if kv_type is None:
            kv = KVCacheType(self._config.type_k, self._config.type_v, self._config.flash_attn)
        else:
            kv = self._kv_cache_type(kv_type, kv_type_v)
        with self._weights.borrowed() as model:
            return kv_bytes_per_slot(model, kv, self.ctx if ctx is None else ctx)

    def _kv_cache_type(self, kv_type: str, kv_type_v: str | None) -> KVCacheType:
        """A KV type checked against this engine's flash-attention setting."""
        type_k, type_v = check_kv_types(kv_type, kv_type_v, self._config.flash_attn)
        return KVCacheType(type_k, type_v, self._config.flash_attn)

    def scorer(self, kv_type: str = "f16", kv_type_v: str | None = None, *, ctx: int = 512) -> Scorer:
        """A private context on this engine's weights that scores token sequences in a KV type.

        For measurements (``nbollama.bench.kv_quality``); close it when done.
        """
        self._check_open()
        kv = self._kv_cache_type(kv_type, kv_type_v)
        weights = self._weights.acquire()
        try:
            return Scorer(weights.model, kv, ctx=ctx, threads=self.threads, release=weights.release)
        except BaseException:
            weights.release()
            raise

    @property
    def kv_estimate(self) -> str:
        streams = self._runner.context.n_seq
        allocated = self._runner.context.kv_bytes
        per_token = (
            allocated // (streams * self.ctx) if allocated else self._model.kv_geometry.bytes_per_token
        )
        spares = streams - self.parallel_max
        who = f"{self.parallel_max} slots" + (
            f" + {spares} spare (reproducible mode pads to {streams})" if spares else ""
        )
        return (
            f"{who} x {self.ctx} ctx x {format_bytes(per_token)}/token ({self.kv_type}) "
            f"= {format_bytes(per_token * streams * self.ctx)}"
        )

    @property
    def load_seconds(self) -> float:
        return self._config.load_seconds

    @property
    def reproducible(self) -> bool:
        """Whether a request's tokens are independent of what else runs (``Engine.load(reproducible=True)``)."""
        return self._config.reproducible

    @property
    def amx(self) -> str:
        """What the AMX guard decided for these weights, in one line (see ``nbollama.amx``)."""
        return self._model.amx.line

    @property
    def summary(self) -> str:
        """The one line that says what was loaded, why parallel is what it is, and (on an AMX CPU) the AMX path."""
        decision = self._model.amx
        return (
            f"nbollama: model={self.model_name} parallel={self.parallel} ctx/slot={self.ctx} "
            f"kv={format_bytes(self.kv_bytes)} ({self.kv_type}) n_batch={self.n_batch} threads={self.threads} "
            f"gpu_layers={self.gpu_layers}{' reproducible' if self.reproducible else ''} "
            f"load={self.load_seconds:.1f}s ({self.parallel_reason})"
            + (f"; {decision.line}" if decision.state != "absent" else "")
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"parallel={self.parallel} ctx/slot={self.ctx}"
        return f"<nbollama.Engine {self.model_name!r} {state}>"

