"""Steps with a KV stream per slot (llama.cpp's ``kv_unified=False``, and reproducible mode).

llama.cpp keeps only a run of consecutive sequence ids with equal token counts
in one ubatch, and each ubatch reads every weight again: these steps lay the
batch out (and pad it with throwaway tokens, removed afterwards) so that a step
costs as few ubatches as its rows allow.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .._api.outputs import TokenLogprob
from ._batch import Batch, chunk_layout, padded_width
from ._llama import DECODE_OK, LlamaContext
from ._masks import FormatMasks, MaskResult
from ._scheduler import Chunk, Decode, StepPlan
from ._slots import Request

__all__ = ["INVARIANT_ROWS", "Row", "Span", "StepOutcome", "StreamSteps"]


@dataclass
class StepOutcome:
    """What one step did: the plan that was decoded, and what each slot's rows gave."""

    status: int  # llama_decode's: 0 ok, 1 no KV room even for the smallest plan, else fatal for the step
    plan: StepPlan
    tokens: dict[int, int] = field(default_factory=dict)  # slot -> sampled token
    failures: dict[int, str] = field(default_factory=dict)  # slot -> why its rows failed
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # slot -> its token's entry
    #: slot -> (position, entry) of each scored prompt token (prompt logprobs, a choice's rest)
    scored: dict[int, list[tuple[int, TokenLogprob]]] = field(default_factory=dict)
    choice_first: dict[int, list[float]] = field(
        default_factory=dict
    )  # slot -> options' first tokens
    #: slot -> the entries of the forced tokens decoded this step (with logprobs), in order
    forced_entries: dict[int, list[TokenLogprob]] = field(default_factory=dict)


@dataclass(frozen=True)
class Span:
    """Tokens ``[start, end)`` of a decode entry, decoded together (a row each where read)."""

    decode: Decode
    start: int
    end: int


#: A row to read after a decode: (slot, batch index of its first row, its chunk or decode span)
Row = tuple[int, int, "Chunk | Span"]


#: Reproducible mode decodes at least this many rows at once. On llama.cpp's CPU
#: backend a row's result depends on how many rows its batch has: 1-3, 4-7 and
#: 8 or more give three different results (the kernels group rows), while any
#: count from 8 up gives the same (measured up to 40). See README, "Reproducible mode".
INVARIANT_ROWS = 8


class StreamSteps:
    """The per-stream step of ``ModelRunner`` (which provides what is declared below)."""

    if TYPE_CHECKING:
        batch: Batch
        context: LlamaContext
        invariant: bool
        masks: FormatMasks

        def _masks_ahead(
            self, plan: StepPlan, requests: Mapping[int, Request]
        ) -> Future[MaskResult] | None: ...
        def _read(
            self,
            outcome: StepOutcome,
            rows: list[Row],
            requests: Mapping[int, Request],
            masks: MaskResult,
        ) -> None: ...
        def _decode(self) -> int: ...
        def _add_chunk(self, chunk: Chunk, request: Request) -> int: ...

    def _run_by_stream(self, plan: StepPlan, requests: Mapping[int, Request]) -> StepOutcome:
        """A stream per slot: all decode rows in one call over consecutive sequence ids, then
        (where they do not ride in that call) each slot's forced tokens alone, then the prompt
        chunks: together, padded to one width, where that is cheaper, else each alone.

        Gaps (idle slots) get a throwaway row, and when slots' forced runs would
        cost more ubatches than padding every entry to the longest does, every
        entry is padded with throwaway tokens to the same length: one ubatch.
        Prompt chunks are weighed the same way (``padded_width``). Reproducible
        mode pads to INVARIANT_ROWS rows, the smallest count whose kernels give
        every row the same result, and decodes each forced run and each prompt
        chunk in a call of its own: what it computes then depends on the
        request alone.
        """
        outcome = StepOutcome(DECODE_OK, plan)
        ahead = self._masks_ahead(plan, requests)  # filled while the first decode runs
        batch, context = self.batch, self.context
        masks: MaskResult | None = None
        span = self._common_width(plan)  # 0: forced runs go alone
        real = {d.slot: d for d in plan.decodes if span or not d.lead_forced}
        if real:
            rows = INVARIANT_ROWS if self.invariant else 1
            first, last = min(real), max(real)
            last = max(last, first + rows - 1)
            if last >= context.n_seq:  # not enough sequences above: extend downwards
                last = context.n_seq - 1
                first = max(0, min(first, last - rows + 1))
            width = max(span, 1)
            batch.clear()
            to_read: list[Row] = []
            throwaway: list[tuple[int, int]] = []
            for seq in range(
                first, last + 1
            ):  # consecutive ids: llama.cpp keeps them in one ubatch
                d = real.get(seq)
                n, end = 0, context.sequence_length(seq)
                if d is not None:
                    n, end = (len(d.tokens) if span else 1), d.pos
                    with_rows = n > 1 and requests[seq].params.logprobs is not None
                    tokens = np.asarray(d.tokens[:n], dtype=np.int32)
                    index = batch.add_span(
                        tokens, end, seq, True, logits_from=end if with_rows else None
                    )
                    to_read.append((seq, index, Span(d, 0, n)))
                    end += n
                if n < width:
                    batch.add_span(np.zeros(width - n, dtype=np.int32), end, seq, False)
                    throwaway.append((seq, end))
            status = self._decode()
            for seq, end in throwaway:
                context.truncate_sequence(seq, end)
            if status != DECODE_OK:
                self.masks.join(ahead)  # the mask thread is done before anyone else uses it
                return StepOutcome(status, StepPlan(plan.decodes))
            masks = self.masks.join(ahead)
            self._read(outcome, to_read, requests, masks)
        for d in plan.decodes:  # forced tokens: after the slot's own row, alone
            start = 0 if d.lead_forced else 1
            if span or start >= len(d.tokens) or d.slot in outcome.failures:
                continue
            batch.clear()
            at = d.pos + start
            with_rows = requests[d.slot].params.logprobs is not None
            index = batch.add_span(
                np.asarray(d.tokens[start:], dtype=np.int32),
                at,
                d.slot,
                True,
                logits_from=at if with_rows else None,
            )
            status = self._decode()
            if status != DECODE_OK:
                outcome.failures[d.slot] = (
                    f"llama_decode failed with status {status} on its forced tokens"
                )
                continue
            masks = self.masks.join(ahead) if masks is None else masks
            self._read(outcome, [(d.slot, index, Span(d, start, len(d.tokens)))], requests, masks)
        together = self._chunks_together(plan, requests)
        alone = plan.chunks if together is None else ()
        if together is not None:
            masks = self.masks.join(ahead) if masks is None else masks
            self._read(outcome, together, requests, masks)
        for c in alone:
            batch.clear()
            index = self._add_chunk(c, requests[c.slot])
            status = self._decode()
            if status != DECODE_OK:
                outcome.failures[c.slot] = (
                    f"llama_decode failed with status {status} on a prompt chunk"
                )
                continue
            masks = self.masks.join(ahead) if masks is None else masks
            self._read(outcome, [(c.slot, index, c)], requests, masks)
        if masks is None:
            self.masks.join(ahead)
        return outcome

    def _chunks_together(self, plan: StepPlan, requests: Mapping[int, Request]) -> list[Row] | None:
        """The plan's prompt chunks in one call, each sequence from the lowest to the highest
        padded as ``chunk_layout`` says, where that costs fewer rows than a call per chunk; the
        rows to read. None: nothing was decoded, each chunk goes alone."""
        chunks, context = {c.slot: c for c in plan.chunks}, self.context
        if self.invariant or len(chunks) < 2 or len(chunks) != len(plan.chunks):
            return None
        spans = {c.slot: (c.start, c.count) for c in plan.chunks}
        layout = chunk_layout(
            spans,
            capacity=self.batch.capacity,
            ctx_per_slot=context.ctx_per_slot,
            end_of=context.sequence_length,
        )
        if layout is None:
            return None
        self.batch.clear()
        together: list[Row] = []
        first = min(chunks)
        ends = {
            first + i: spans.get(first + i, (context.sequence_length(first + i), 0))
            for i in range(len(layout))
        }
        for (seq, (start, n)), width in zip(ends.items(), layout):  # in order: consecutive ids
            if seq in chunks:
                together.append((seq, self._add_chunk(chunks[seq], requests[seq]), chunks[seq]))
            if n < width:
                self.batch.add_span(np.zeros(width - n, dtype=np.int32), start + n, seq, False)
        status = self._decode()
        for seq, (start, n) in ends.items():  # throwaway tokens go, and all of a failed call
            context.truncate_sequence(seq, start + n if status == DECODE_OK else start)
        return together if status == DECODE_OK else None

    def _common_width(self, plan: StepPlan) -> int:
        """The length every decode entry is padded to so that the forced runs ride in the decode
        rows' ubatch; 0 when they go alone (reproducible mode, no runs, no room, or padding
        that costs more rows than the ubatches it saves)."""
        runs = sum(1 for d in plan.decodes if len(d.tokens) > 1 or d.lead_forced)
        if self.invariant or not runs:
            return 0
        return padded_width(
            {d.slot: (d.pos, len(d.tokens)) for d in plan.decodes},
            capacity=self.batch.capacity,
            ctx_per_slot=self.context.ctx_per_slot,
            end_of=self.context.sequence_length,
            gap_rows=1,  # a gap gets a throwaway row anyway
            saved=runs,
        )
