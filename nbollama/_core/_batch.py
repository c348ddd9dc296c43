"""A reusable ``llama_batch`` over numpy arrays nbollama owns: a prompt chunk goes in with slice assignments."""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Callable, Mapping, Sequence

import llama_cpp as ll
import numpy as np
import numpy.typing as npt

__all__ = ["UBATCH_ROWS", "Batch", "chunk_layout", "padded_width"]

#: A ubatch reads every weight once more: on this CPU (2 threads or 1) that costs about as much
#: as 8-10 more rows of the same ubatch, so padding entries by up to this many throwaway rows
#: per ubatch saved is a gain.
UBATCH_ROWS = 8


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


def padded_width(
    spans: Mapping[int, tuple[int, int]],
    *,
    capacity: int,
    ctx_per_slot: int,
    end_of: Callable[[int], int],
    gap_rows: int | None,
    saved: int,
) -> int:
    """The length every sequence from the lowest to the highest of ``spans`` (seq -> (start,
    count)) is padded to with throwaway tokens so that all go in one ubatch, or 0 when that
    costs more rows than the ``saved`` ubatches are worth (UBATCH_ROWS each), overflows the
    batch, or a throwaway token would not fit a slot's context (``end_of``: a gap's end).

    With a KV stream per slot llama.cpp keeps only a run of consecutive sequence ids with
    equal token counts in one ubatch. A gap (a sequence without a span) counts ``gap_rows``
    rows that are paid anyway (None: the full width)."""
    if not spans or saved <= 0:
        return 0
    width = max(count for _, count in spans.values())
    first, last = min(spans), max(spans)
    seqs = last - first + 1
    if seqs * width > capacity:
        return 0
    for seq in range(first, last + 1):
        start = spans[seq][0] if seq in spans else end_of(seq)
        if start + width > ctx_per_slot:
            return 0
    gaps = seqs - len(spans)
    paid = sum(count for _, count in spans.values()) + gaps * (
        width if gap_rows is None else gap_rows
    )
    return width if seqs * width - paid <= UBATCH_ROWS * saved else 0


#: ``chunk_layout`` tries at most this many lengths in one call, raised to from at most
#: LEVEL_CANDIDATES of the chunks' counts: 37 layouts at most, whatever the number of slots.
MAX_LEVELS = 3
LEVEL_CANDIDATES = 8


def ubatch_rows(counts: Sequence[int]) -> int:
    """What one call of consecutive sequences with these token counts costs, in rows: llama.cpp
    (a stream per slot) takes the longest run of consecutive sequences with tokens left, as
    many tokens of each as the fewest has, and repeats; each ubatch costs UBATCH_ROWS more."""
    left, cost = list(counts), 0
    while any(left):
        first = next(i for i, n in enumerate(left) if n)
        end = next((i for i in range(first, len(left)) if not left[i]), len(left))
        taken = min(left[first:end])
        left[first:end] = [n - taken for n in left[first:end]]
        cost += UBATCH_ROWS + taken * (end - first)
    return cost


def chunk_layout(
    spans: Mapping[int, tuple[int, int]],
    *,
    capacity: int,
    ctx_per_slot: int,
    end_of: Callable[[int], int],
) -> list[int] | None:
    """How many tokens (a chunk's own, then throwaway ones) each sequence from the lowest to
    the highest of ``spans`` (seq -> (start, count)) gets so that the chunks cost the fewest
    rows in one call: each count is raised to the next of a few levels, a gap (a sequence
    without a chunk) to nothing or the lowest level. None: a call per chunk is cheaper."""
    first, last = min(spans), max(spans)
    seqs = range(first, last + 1)
    starts = [spans[s][0] if s in spans else end_of(s) for s in seqs]
    counts = [spans[s][1] if s in spans else 0 for s in seqs]
    best, layout = sum(counts) + UBATCH_ROWS * len(spans), None  # each chunk alone
    distinct = sorted(set(c for c in counts if c))
    lowers = distinct[:-1]
    if len(lowers) > LEVEL_CANDIDATES:  # many slots: an even sample of the counts, so a step stays cheap
        step = len(lowers) / LEVEL_CANDIDATES
        lowers = [lowers[int(i * step)] for i in range(LEVEL_CANDIDATES)]
    for k in range(min(len(lowers), MAX_LEVELS - 1) + 1):  # the highest count and up to 2 others
        for lower in itertools.combinations(lowers, k):
            levels = [*lower, distinct[-1]]
            for gap in {0, levels[0]}:
                padded = [next(v for v in levels if v >= c) if c else gap for c in counts]
                if sum(padded) > capacity or any(
                    s + n > ctx_per_slot for s, n in zip(starts, padded)
                ):
                    continue
                cost = ubatch_rows(padded)
                if cost < best:
                    best, layout = cost, padded
    return layout
