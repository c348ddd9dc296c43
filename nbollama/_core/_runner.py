"""The model runner: the only part of the engine that touches the llama.cpp context, batch and samplers.

``run(plan)`` fills one batch from a ``StepPlan``, decodes it (halving the
prompt chunks while the KV cache has no room) and samples every slot that
has logits. A slot whose sampling fails is reported alone, so the engine can
fail that request and keep the others, as llama.cpp's server releases only
the slot that failed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._api.requests import SamplingParams
from ..exceptions import EngineError
from ._llama import (
    DECODE_NO_KV_SLOT,
    DECODE_OK,
    Batch,
    LlamaContext,
    LlamaModel,
)
from ._sampler import Sampler, make_sampler
from ._scheduler import StepPlan
from ._slots import Request

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["ModelRunner", "StepOutcome"]


@dataclass
class StepOutcome:
    """What one step did: the plan that was decoded, and each slot's sampled token or error."""

    status: int  # llama_decode's: 0 ok, 1 no KV room even for the smallest plan, else fatal for the step
    plan: StepPlan
    tokens: dict[int, int] = field(default_factory=dict)  # slot -> sampled token
    failures: dict[int, str] = field(default_factory=dict)  # slot -> why sampling failed


#: Reproducible mode decodes at least this many rows at once. On llama.cpp's CPU
#: backend a row's result depends on how many rows its batch has: 1-3, 4-7 and
#: 8 or more give three different results (the kernels group rows), while any
#: count from 8 up gives the same (measured up to 40). See README, "Reproducible mode".
INVARIANT_ROWS = 8


class ModelRunner:
    """Fills batches from plans, decodes them, samples.

    ``invariant=True`` (reproducible mode) runs each plan so that no row's
    numbers depend on the rest: the decode rows go in one ``llama_decode`` of
    at least ``INVARIANT_ROWS`` consecutive sequences (idle and spare ones get
    a throwaway token), and each prompt chunk goes alone in a call of its own.
    """

    def __init__(
        self, model: LlamaModel, context: LlamaContext, n_batch: int, *, invariant: bool = False
    ) -> None:
        self.model = model
        self.context = context
        self.batch = Batch(max(n_batch, context.n_seq))
        self.invariant = invariant

    def sampler_for(self, params: SamplingParams, prompt: npt.NDArray[np.int32]) -> Sampler:
        return make_sampler(params, n_vocab=self.model.n_vocab, prompt=prompt)

    def reset_sequence(self, seq: int) -> None:
        self.context.clear_sequence(seq)

    def keep_prefix(self, seq: int, keep: int) -> None:
        """Drop a sequence's positions from ``keep`` on (all of it when 0)."""
        self.context.truncate_sequence(seq, keep)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self.context.copy_prefix(src, dst, n)

    def run(self, plan: StepPlan, requests: Mapping[int, Request]) -> StepOutcome:
        """Decode ``plan`` (``requests``: slot -> its request), then sample where logits came out."""
        if self.invariant or not self.context.kv_unified:
            return self._run_by_stream(plan, requests)
        current: StepPlan | None = plan
        status = DECODE_NO_KV_SLOT
        outputs: dict[int, int] = {}
        while current is not None:
            outputs = self._fill(current, requests)
            status = self.context.decode(self.batch)
            if status != DECODE_NO_KV_SLOT:
                break
            smaller = current.shrink_prefill()
            if smaller is None:
                break
            current = smaller
        decoded = current if current is not None else plan
        outcome = StepOutcome(status, decoded)
        if status != DECODE_OK:
            return outcome
        for slot, index in outputs.items():
            self._sample(outcome, slot, index, requests[slot])
        return outcome

    def _sample(self, outcome: StepOutcome, slot: int, index: int, request: Request) -> None:
        try:
            assert request.sampler is not None, "a slot with logits has no sampler"
            outcome.tokens[slot] = request.sampler.sample(self.context, index)
        except Exception as exc:  # one slot's sampler: that request fails, the step goes on
            outcome.failures[slot] = f"sampling failed: {type(exc).__name__}: {exc}"

    def _run_by_stream(self, plan: StepPlan, requests: Mapping[int, Request]) -> StepOutcome:
        """A stream per slot: all decode rows in one call over consecutive sequence ids, then each chunk alone.

        llama.cpp splits a batch into one ubatch per run of consecutive sequence
        ids with equal token counts, so a gap (an idle slot) or a prompt chunk
        beside the decode rows would cost extra ubatches: gaps get a throwaway
        row, removed afterwards. Reproducible mode pads to INVARIANT_ROWS rows,
        the smallest count whose kernels give every row the same result.
        """
        outcome = StepOutcome(DECODE_OK, plan)
        batch, context = self.batch, self.context
        rows = INVARIANT_ROWS if self.invariant else 1
        if plan.decodes:
            real = {d.slot: d for d in plan.decodes}
            first, last = min(real), max(real)
            last = max(last, first + rows - 1)
            if last >= context.n_seq:  # not enough sequences above: extend downwards
                last = context.n_seq - 1
                first = max(0, min(first, last - rows + 1))
            batch.clear()
            outputs: dict[int, int] = {}
            throwaway: list[tuple[int, int]] = []
            for seq in range(
                first, last + 1
            ):  # consecutive ids: llama.cpp keeps them in one ubatch
                d = real.get(seq)
                if d is not None:
                    outputs[seq] = batch.add(d.token, d.pos, seq, True)
                else:
                    end = context.sequence_length(seq)
                    batch.add(0, end, seq, False)
                    throwaway.append((seq, end))
            status = context.decode(batch)
            for seq, end in throwaway:
                context.truncate_sequence(seq, end)
            if status != DECODE_OK:
                return StepOutcome(status, StepPlan(plan.decodes))
            for slot, index in outputs.items():
                self._sample(outcome, slot, index, requests[slot])
        for c in plan.chunks:
            batch.clear()
            tokens = requests[c.slot].tokens[c.start : c.start + c.count]
            index = batch.add_span(tokens, c.start, c.slot, c.ends_prompt)
            status = context.decode(batch)
            if status != DECODE_OK:
                outcome.failures[c.slot] = (
                    f"llama_decode failed with status {status} on a prompt chunk"
                )
                continue
            if c.ends_prompt:
                self._sample(outcome, c.slot, index, requests[c.slot])
        return outcome

    def time_decode(self, rows: int) -> float:
        """Seconds one decode step of ``rows`` sequences takes (throwaway tokens, removed after).

        Adaptive parallelism times a few of these at load, so its first
        choice rests on this machine's figures rather than a guess.
        """
        batch, context = self.batch, self.context
        batch.clear()
        ends = [context.sequence_length(seq) for seq in range(rows)]
        for seq, end in enumerate(ends):
            batch.add(0, end, seq, True)
        start = time.perf_counter()
        status = context.decode(batch)
        seconds = time.perf_counter() - start
        for seq, end in enumerate(ends):
            context.truncate_sequence(seq, end)
        if status != DECODE_OK:
            raise EngineError(f"llama_decode failed with status {status} while timing {rows} rows")
        return seconds

    def _fill(self, plan: StepPlan, requests: Mapping[int, Request]) -> dict[int, int]:
        """Put the plan in the batch; slot -> batch index of its logits."""
        batch = self.batch
        batch.clear()
        outputs: dict[int, int] = {}
        for d in plan.decodes:
            outputs[d.slot] = batch.add(d.token, d.pos, d.slot, True)
        for c in plan.chunks:
            tokens = requests[c.slot].tokens[c.start : c.start + c.count]
            last = batch.add_span(tokens, c.start, c.slot, c.ends_prompt)
            if c.ends_prompt:
                outputs[c.slot] = last
        return outputs

    def close(self) -> None:
        self.context.close()
