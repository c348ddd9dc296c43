"""The model runner: the only part of the engine that touches the llama.cpp context, batch and samplers.

``run(plan)`` fills one batch from a ``StepPlan``, decodes it (halving the
prompt chunks while the KV cache has no room) and reads every row of logits
it asked for: each slot's next token (within its format's mask, with its
log-probabilities when asked), the scored prompt positions, and the first
tokens of a request's choices. A slot whose row fails is reported alone, so
the engine can fail that request and keep the others, as llama.cpp's server
releases only the slot that failed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import llguidance
import llguidance.numpy
import numpy as np
import numpy.typing as npt

from .._api.outputs import TokenLogprob
from .._api.requests import SamplingParams
from ..exceptions import EngineError
from ._llama import (
    DECODE_NO_KV_SLOT,
    DECODE_OK,
    Batch,
    LlamaContext,
    LlamaModel,
)
from ._logits import apply_mask, entry_for, masked_argmax, row_stats
from ._sampler import GreedySampler, Sampler, make_sampler
from ._scheduler import Chunk, StepPlan
from ._slots import Request

__all__ = ["ModelRunner", "StepOutcome"]


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


#: A row to read after a decode: (slot, batch index of its first row, its chunk; None for a decode)
_Row = tuple[int, int, "Chunk | None"]


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
        self._masks: npt.NDArray[np.int32] | None = None  # one llguidance bitmask row per slot
        self._mask_thread: ThreadPoolExecutor | None = None

    def sampler_for(self, params: SamplingParams, prompt: npt.NDArray[np.int32]) -> Sampler:
        """(For a request that generates; a choice is scored and has none.)"""
        return make_sampler(params, n_vocab=self.model.n_vocab, prompt=prompt)

    def reset_sequence(self, seq: int) -> None:
        self.context.clear_sequence(seq)

    def keep_prefix(self, seq: int, keep: int) -> None:
        """Drop a sequence's positions from ``keep`` on (all of it when 0)."""
        self.context.truncate_sequence(seq, keep)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self.context.copy_prefix(src, dst, n)

    def run(self, plan: StepPlan, requests: Mapping[int, Request]) -> StepOutcome:
        """Decode ``plan`` (``requests``: slot -> its request), then read the rows it asked for."""
        if self.invariant or not self.context.kv_unified:
            return self._run_by_stream(plan, requests)
        ahead = self._masks_ahead(plan, requests)
        current: StepPlan | None = plan
        status = DECODE_NO_KV_SLOT
        rows: list[_Row] = []
        while current is not None:
            rows = self._fill(current, requests)
            status = self.context.decode(self.batch)
            if status != DECODE_NO_KV_SLOT:
                break
            smaller = current.shrink_prefill()
            if smaller is None:
                break
            current = smaller
        decoded = current if current is not None else plan
        outcome = StepOutcome(status, decoded)
        masks = _masks_of(ahead)  # joined even when the decode failed: the thread is free again
        if status != DECODE_OK:
            return outcome
        self._read(outcome, rows, requests, masks)
        return outcome

    def _read(
        self,
        outcome: StepOutcome,
        rows: list[_Row],
        requests: Mapping[int, Request],
        masks: Mapping[int, npt.NDArray[np.int32] | str],
    ) -> None:
        """Everything the rows of the last decode say, before the next decode overwrites them."""
        sampling: list[tuple[int, int]] = []  # (slot, batch index)
        for slot, index, chunk in rows:
            request = requests[slot]
            if chunk is None:
                sampling.append((slot, index))
                continue
            try:
                if request.logits_from is not None:
                    self._score_chunk(outcome, request, chunk, index)
                if chunk.ends_prompt and request.choice is not None:
                    if request.choice.current is None:  # the prompt's last row: every first token
                        last = index + chunk.count - 1
                        outcome.choice_first[slot] = self._first_tokens(request, last)
                    continue  # a choice is scored, never sampled
            except Exception as exc:  # this request's rows: it fails alone
                outcome.failures[slot] = f"reading its logits failed: {type(exc).__name__}: {exc}"
                continue
            if chunk.ends_prompt:
                sampling.append((slot, index + chunk.count - 1))
        for slot, index in sampling:
            mask = masks.get(slot)
            if (
                requests[slot].matcher is not None
                and not isinstance(requests[slot].sampler, GreedySampler)
                and not isinstance(mask, np.ndarray)
            ):
                outcome.failures[slot] = f"its format's token mask failed: {mask or 'not computed'}"
                continue
            self._sample(
                outcome, slot, index, requests[slot], mask if isinstance(mask, np.ndarray) else None
            )

    def _score_chunk(
        self, outcome: StepOutcome, request: Request, chunk: Chunk, first: int
    ) -> None:
        """The log-probability of the token after each row of this chunk (from ``logits_from`` on)."""
        assert request.logits_from is not None
        following = request.tokens[chunk.start + 1 : chunk.start + chunk.count + 1].tolist()
        choice = request.choice
        if choice is not None and choice.current is not None and chunk.ends_prompt:
            following.append(int(choice.tokens[choice.current][-1]))  # the option's last token
        k = request.params.logprobs or 0
        scored = outcome.scored.setdefault(chunk.slot, [])
        for pos in range(max(chunk.start, request.logits_from), chunk.start + chunk.count):
            offset = pos - chunk.start
            if offset >= len(following):
                break
            row = self.context.logits_row(first + offset)
            entry = entry_for(row, row_stats(row, k), following[offset], self.model.piece)
            scored.append((pos + 1, entry))

    def _first_tokens(self, request: Request, index: int) -> list[float]:
        """Every option's first-token log-probability, from one row."""
        assert request.choice is not None
        row = self.context.logits_row(index)
        lse = row_stats(row, 0).lse
        return [float(row[t]) - lse for t in request.choice.first_tokens]

    def _masks_ahead(
        self, plan: StepPlan, requests: Mapping[int, Request]
    ) -> Future[dict[int, npt.NDArray[np.int32] | str]] | None:
        """Start filling the token masks of the plan's constrained slots, to overlap the decode.

        A mask depends only on what the format has consumed so far, never on
        the logits about to be computed, so llguidance (which releases the GIL)
        fills it on a thread of its own while ``llama_decode`` runs. Greedy
        slots are left out: they check their argmax first and need a mask only
        when it is refused (``_pick_greedy``).
        """
        sampled = [d.slot for d in plan.decodes] + [c.slot for c in plan.chunks if c.ends_prompt]
        matchers = [
            (slot, m)
            for slot in sampled
            if (m := requests[slot].matcher) is not None
            and not isinstance(requests[slot].sampler, GreedySampler)
        ]
        if not matchers:
            return None
        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="nbollama-masks")
        return self._mask_thread.submit(_fill_masks, matchers, self._mask_rows())

    def _mask_rows(self) -> npt.NDArray[np.int32]:
        if self._masks is None:
            self._masks = llguidance.numpy.allocate_token_bitmask(
                self.context.n_seq, self.model.n_vocab
            )
        return self._masks

    def _pick_greedy(
        self, row: npt.NDArray[np.float32], matcher: llguidance.LLMatcher, slot: int
    ) -> int:
        """llama.cpp's grammar fast path: the argmax, if the format takes it (checking one token
        costs a fraction of a mask over 262k); else the best token the mask allows."""
        token = int(row.argmax())
        if matcher.validate_tokens([token]) == 1:
            return token
        masks = self._mask_rows()
        llguidance.numpy.fill_next_token_bitmask(matcher, masks, slot)
        return masked_argmax(row, masks[slot])

    def _sample(
        self,
        outcome: StepOutcome,
        slot: int,
        index: int,
        request: Request,
        mask: npt.NDArray[np.int32] | None,
    ) -> None:
        """One slot's next token: log-probabilities from the raw row, then the mask, then the pick."""
        try:
            sampler = request.sampler
            assert sampler is not None, "a slot with logits has no sampler"
            row = self.context.logits_row(index)
            k = request.params.logprobs
            stats = row_stats(row, k) if k is not None else None
            matcher = request.matcher
            if matcher is not None and isinstance(sampler, GreedySampler):
                token = self._pick_greedy(row, matcher, slot)
            elif mask is None:
                token = sampler.sample(self.context, index)
            else:
                apply_mask(row, mask)  # the chain reads this row in place: allowed tokens only
                token = sampler.sample(self.context, index)
            if stats is not None:
                outcome.logprobs[slot] = entry_for(row, stats, token, self.model.piece)
            if matcher is not None and not matcher.consume_token(token):
                raise ValueError(f"the format refused token {token}: {matcher.get_error()}")
            outcome.tokens[slot] = token
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
        ahead = self._masks_ahead(plan, requests)  # filled while the first decode runs
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
            to_read: list[_Row] = []
            throwaway: list[tuple[int, int]] = []
            for seq in range(
                first, last + 1
            ):  # consecutive ids: llama.cpp keeps them in one ubatch
                d = real.get(seq)
                if d is not None:
                    to_read.append((seq, batch.add(d.token, d.pos, seq, True), None))
                else:
                    end = context.sequence_length(seq)
                    batch.add(0, end, seq, False)
                    throwaway.append((seq, end))
            status = context.decode(batch)
            for seq, end in throwaway:
                context.truncate_sequence(seq, end)
            if status != DECODE_OK:
                _masks_of(ahead)  # the mask thread is done before anyone else uses it
                return StepOutcome(status, StepPlan(plan.decodes))
            self._read(outcome, to_read, requests, _masks_of(ahead))
        for c in plan.chunks:
            batch.clear()
            first = self._add_chunk(c, requests[c.slot])
            status = context.decode(batch)
            if status != DECODE_OK:
                outcome.failures[c.slot] = (
                    f"llama_decode failed with status {status} on a prompt chunk"
                )
                continue
            self._read(outcome, [(c.slot, first, c)], requests, _masks_of(ahead))
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

    def _fill(self, plan: StepPlan, requests: Mapping[int, Request]) -> list[_Row]:
        """Put the plan in the batch; the rows to read after the decode."""
        batch = self.batch
        batch.clear()
        rows: list[_Row] = [
            (d.slot, batch.add(d.token, d.pos, d.slot, True), None) for d in plan.decodes
        ]
        rows += [(c.slot, self._add_chunk(c, requests[c.slot]), c) for c in plan.chunks]
        return rows

    def _add_chunk(self, chunk: Chunk, request: Request) -> int:
        """A prompt chunk into the batch, with a row wherever one is read; its first batch index."""
        tokens = request.tokens[chunk.start : chunk.start + chunk.count]
        return self.batch.add_span(
            tokens, chunk.start, chunk.slot, chunk.ends_prompt, logits_from=request.logits_from
        )

    def close(self) -> None:
        if self._mask_thread is not None:
            self._mask_thread.shutdown(wait=True)
        self.context.close()


def _fill_masks(
    matchers: list[tuple[int, llguidance.LLMatcher]], masks: npt.NDArray[np.int32]
) -> dict[int, npt.NDArray[np.int32] | str]:
    """(The mask thread.) Each matcher's next-token mask into its slot's row; a failure is that
    slot's alone, named."""
    out: dict[int, npt.NDArray[np.int32] | str] = {}
    for slot, matcher in matchers:
        try:
            llguidance.numpy.fill_next_token_bitmask(matcher, masks, slot)
            out[slot] = masks[slot]
        except Exception as exc:
            out[slot] = f"{type(exc).__name__}: {exc}"
    return out


def _masks_of(
    ahead: Future[dict[int, npt.NDArray[np.int32] | str]] | None,
) -> dict[int, npt.NDArray[np.int32] | str]:
    return ahead.result() if ahead is not None else {}
