"""A reusable ``llama_batch`` over numpy arrays nbollama owns: a prompt chunk goes in with slice assignments."""

from __future__ import annotations

import ctypes

import llama_cpp as ll
import numpy as np
import numpy.typing as npt

__all__ = ["Batch"]


class Batch:
    """A reusable ``llama_batch`` of up to ``capacity`` tokens, over numpy arrays we own.

    Owning the arrays (instead of ``llama_batch_init``) lets a prompt chunk go
    in with a few slice assignments rather than a Python loop per token.
    """

    def __init__(self, capacity: int, seqs_per_token: int = 1) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_id = np.zeros((capacity, seqs_per_token), dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        row_bytes = self.seq_id.strides[0]
        base = self.seq_id.ctypes.data
        seq_ptr = ctypes.POINTER(ll.llama_seq_id)
        self._seq_rows = (seq_ptr * capacity)(
            *(ctypes.cast(base + i * row_bytes, seq_ptr) for i in range(capacity))
        )
        # the fields as keywords: llama_cpp annotates its pointer fields as ctypes Arrays
        raw = ll.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(ctypes.POINTER(ll.llama_token)),
            embd=ctypes.POINTER(ctypes.c_float)(),
            pos=self.pos.ctypes.data_as(ctypes.POINTER(ll.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=ctypes.cast(self._seq_rows, ctypes.POINTER(seq_ptr)),
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )
        self.raw = raw
        self.n_tokens = 0

    def clear(self) -> None:
        self.n_tokens = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token; returns its index (where its logits land when asked for)."""
        i = self.n_tokens
        self.token[i] = token
        self.pos[i] = pos
        self.n_seq_id[i] = 1
        self.seq_id[i, 0] = seq
        self.logits[i] = logits
        self.n_tokens = self.raw.n_tokens = i + 1
        return i

    def add_span(
        self,
        tokens: npt.NDArray[np.int32],
        start_pos: int,
        seq: int,
        logits_last: bool,
        *,
        logits_from: int | None = None,
    ) -> int:
        """Append consecutive tokens of one sequence from position ``start_pos``; the first one's
        index. Logits come for the last token (``logits_last``) and for every position from
        ``logits_from`` on."""
        i, n = self.n_tokens, len(tokens)
        end = i + n
        self.token[i:end] = tokens
        self.pos[i:end] = np.arange(start_pos, start_pos + n, dtype=np.int32)
        self.n_seq_id[i:end] = 1
        self.seq_id[i:end, 0] = seq
        self.logits[i:end] = 0
        if logits_from is not None:
            self.logits[i + max(logits_from - start_pos, 0) : end] = 1
        if logits_last:
            self.logits[end - 1] = 1
        self.n_tokens = self.raw.n_tokens = end
        return i
