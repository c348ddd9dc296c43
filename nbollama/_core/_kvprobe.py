"""What a KV-cache type costs and does, asked of llama.cpp itself.

``kv_bytes_per_slot`` makes a small context in the type and reads the KV
buffer llama.cpp allocated, so block sizes, padding and sliding-window layers
are llama.cpp's own accounting, not a formula of ours. ``Scorer`` runs token
sequences through a private context of a given type and returns the
next-token distributions, which is how the KV-quality measurement compares a
type against f16 on exactly the same batches.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .._api.kvcache import kv_label
from ..exceptions import InvalidParamsError
from ._batch import Batch
from ._llama import LlamaContext, LlamaModel
from ._logits import row_stats

__all__ = ["KVCacheType", "Scorer", "ScoredSequence", "kv_bytes_per_slot"]

#: Cells of the probe context: big enough that llama.cpp's 0.01 MiB rounding is < 0.1%.
_PROBE_CELLS = 1024
#: Positions scored per decode (llama.cpp keeps a vocabulary-sized row of logits for each).
_SCORE_CHUNK = 64

_probe_lock = threading.Lock()


@dataclass(frozen=True)
class KVCacheType:
    """The KV cache's precision: K's type, V's type, and flash attention (None: llama.cpp decides)."""

    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool | None = None

    @property
    def label(self) -> str:
        return kv_label(self.type_k, self.type_v)


def kv_bytes_per_slot(model: LlamaModel, kv: KVCacheType, ctx: int) -> int:
    """One slot's KV bytes at ``ctx`` tokens in this type, from a probe context (cached per model)."""
    cache: dict[KVCacheType, float] = model.__dict__.setdefault("_kv_cell_bytes", {})
    with _probe_lock:
        if kv not in cache:
            probe = LlamaContext(
                model,
                n_seq=1,
                ctx_per_slot=_PROBE_CELLS,
                n_batch=32,
                threads=1,
                flash_attn=kv.flash_attn,
                type_k=kv.type_k,
                type_v=kv.type_v,
            )
            try:
                cache[kv] = probe.kv_bytes / _PROBE_CELLS
            finally:
                probe.close()
    return int(round(cache[kv] * ctx))


@dataclass(frozen=True)
class ScoredSequence:
    """What one sequence scored: each next token's log-probability, and full rows where asked."""

    token_logprobs: npt.NDArray[np.float64]  # [i]: log p(token i+1 | tokens 0..i)
    rows: npt.NDArray[np.float32]  # log-softmax rows for positions rows_from .. end-2


class Scorer:
    """A private one-sequence context on loaded weights that scores token sequences.

    Every sequence is decoded in the same chunks whatever the KV type, so two
    scorers differ only in the cache's precision.
    """

    def __init__(
        self,
        model: LlamaModel,
        kv: KVCacheType,
        *,
        ctx: int,
        threads: int,
        release: Callable[[], object] | None = None,
    ) -> None:
        self.kv = kv
        self._release = release  # gives back the weights the scorer borrowed
        self._context = LlamaContext(
            model,
            n_seq=1,
            ctx_per_slot=ctx,
            n_batch=_SCORE_CHUNK,
            threads=threads,
            flash_attn=kv.flash_attn,
            type_k=kv.type_k,
            type_v=kv.type_v,
        )
        self._batch = Batch(_SCORE_CHUNK)

    @property
    def ctx(self) -> int:
        return self._context.ctx_per_slot

    def score(self, tokens: list[int], rows_from: int | None = None) -> ScoredSequence:
        """Decode ``tokens`` from an empty cache; keep full rows for positions ``>= rows_from``."""
        if len(tokens) < 2:
            raise InvalidParamsError("scoring needs at least 2 tokens")
        if len(tokens) > self.ctx:
            raise InvalidParamsError(
                f"{len(tokens)} tokens do not fit the scorer's context of {self.ctx}"
            )
        context = self._context
        context.clear_sequence(0)
        keep_from = len(tokens) if rows_from is None else rows_from
        logprobs = np.empty(len(tokens) - 1, dtype=np.float64)
        rows: list[npt.NDArray[np.float32]] = []
        for start in range(0, len(tokens) - 1, _SCORE_CHUNK):
            chunk = tokens[start : start + _SCORE_CHUNK]
            self._batch.clear()
            for offset, token in enumerate(chunk):
                self._batch.add(token, start + offset, 0, start + offset < len(tokens) - 1)
            status = context.decode(self._batch)
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status} while scoring")
            for offset in range(len(chunk)):
                pos = start + offset
                if pos >= len(tokens) - 1:
                    break
                row = context.logits_row(offset)
                lse = row_stats(row, 0).lse
                logprobs[pos] = float(row[tokens[pos + 1]]) - lse
                if pos >= keep_from:
                    rows.append((row - np.float32(lse)).astype(np.float32))
        stacked = np.stack(rows) if rows else np.empty((0, context.n_vocab), dtype=np.float32)
        return ScoredSequence(logprobs, stacked)

    def close(self) -> None:
        self._context.close()
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
