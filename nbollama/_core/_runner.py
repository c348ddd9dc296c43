"""The model runner: the only part of the engine that touches the llama.cpp context, batch and samplers.

``run(plan)`` fills one batch from a ``StepPlan``, decodes it (halving the
prompt chunks while the KV cache has no room) and reads every row of logits
it asked for: each slot's next token (within its format's mask, with its
log-probabilities when asked), the entries of the tokens its format forced
(jump-forward, see ``_jump``), the scored prompt positions, and the first
tokens of a request's choices. A slot whose row fails is reported alone, so
the engine can fail that request and keep the others, as llama.cpp's server
releases only the slot that failed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import Future

import numpy as np
import numpy.typing as npt

from .._api.outputs import TokenLogprob
from .._api.requests import SamplingParams
from ..exceptions import EngineError
from ._batch import Batch
from ._jump import StepTimes
from ._llama import (
    DECODE_NO_KV_SLOT,
    DECODE_OK,
    LlamaContext,
    LlamaModel,
)
from ._logits import apply_mask, entry_for, row_stats
from ._masks import FormatMasks, MaskResult
from ._sampler import GreedySampler, Sampler, make_sampler
from ._scheduler import Chunk, StepPlan
from ._slots import Request
from ._streams import INVARIANT_ROWS, Row, Span, StepOutcome, StreamSteps

__all__ = ["INVARIANT_ROWS", "ModelRunner", "StepOutcome"]


class ModelRunner(StreamSteps):
    """Fills batches from plans, decodes them, samples.

    ``invariant=True`` (reproducible mode) runs each plan so that no row's
    numbers depend on the rest: the decode rows go in one ``llama_decode`` of
    at least ``INVARIANT_ROWS`` consecutive sequences (idle and spare ones get
    a throwaway token), and each prompt chunk, and each slot's run of forced
    tokens, goes alone in a call of its own.
    ``greedy_masks_ahead``: fill greedy slots' masks during the decode too
    (else a greedy slot checks its argmax with llguidance and fills a mask
    only when it is refused). Worth it where a core is free while the decode
    runs; where the decode's threads take every core, the mask thread takes
    its time from the decode, and the check costs a fraction of a mask.
    """

    def __init__(
        self,
        model: LlamaModel,
        context: LlamaContext,
        n_batch: int,
        *,
        invariant: bool = False,
        greedy_masks_ahead: bool = True,
    ) -> None:
        self.model = model
        self.context = context
        self.batch = Batch(max(n_batch, context.n_seq))
        self.invariant = invariant
        self.greedy_masks_ahead = greedy_masks_ahead
        self.times = StepTimes()
        self.masks = FormatMasks(context.n_seq, model.n_vocab, self.times)

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

    def save_sequence(self, seq: int) -> bytearray:
        return self.context.save_sequence(seq)

    def restore_sequence(self, seq: int, state: bytes | bytearray) -> bool:
        return self.context.restore_sequence(seq, state)

    def run(self, plan: StepPlan, requests: Mapping[int, Request]) -> StepOutcome:
        """Decode ``plan`` (``requests``: slot -> its request), then read the rows it asked for."""
        self.times.steps += 1
        if self.invariant or not self.context.kv_unified:
            return self._run_by_stream(plan, requests)
        ahead = self._masks_ahead(plan, requests)
        current: StepPlan | None = plan
        status = DECODE_NO_KV_SLOT
        rows: list[Row] = []
        while current is not None:
            rows = self._fill(current, requests)
            status = self._decode()
            if status != DECODE_NO_KV_SLOT:
                break
            smaller = current.shrink_prefill()
            if smaller is None:
                break
            current = smaller
        decoded = current if current is not None else plan
        outcome = StepOutcome(status, decoded)
        masks = self.masks.join(ahead)  # joined even when the decode failed: the thread is free again
        if status != DECODE_OK:
            return outcome
        self._read(outcome, rows, requests, masks)
        return outcome

    def _read(
        self,
        outcome: StepOutcome,
        rows: list[Row],
        requests: Mapping[int, Request],
        masks: MaskResult,
    ) -> None:
        """Everything the rows of the last decode say, before the next decode overwrites them."""
        sampling: list[tuple[int, int]] = []  # (slot, batch index)
        for slot, index, item in rows:
            request = requests[slot]
            try:
                if isinstance(item, Span):
                    if self._read_span(outcome, item, index, request):
                        sampling.append((slot, index + item.end - item.start - 1))
                    continue
                chunk = item
                last = index + chunk.count - 1
                if request.logits_from is not None:
                    self._score_chunk(outcome, request, chunk, index)
                if chunk.ends_prompt and request.choice is not None:
                    if request.choice.current is None:  # the prompt's last row: every first token
                        outcome.choice_first[slot] = self._first_tokens(request, last)
                    continue  # a choice is scored, never sampled
                if chunk.ends_prompt and request.start_forced:  # the format's first tokens follow
                    k = request.params.logprobs
                    if k is not None:
                        row = self.context.logits_row(last)
                        entry = entry_for(
                            row, row_stats(row, k), request.start_forced[0], self.model.piece
                        )
                        request.lead_entry = _forced(entry)
                    continue
            except Exception as exc:  # this request's rows: it fails alone
                outcome.failures[slot] = f"reading its logits failed: {type(exc).__name__}: {exc}"
                continue
            if chunk.ends_prompt:
                sampling.append((slot, last))
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

    def _read_span(self, outcome: StepOutcome, span: Span, first: int, request: Request) -> bool:
        """The entries of the forced tokens these rows predict (with logprobs); whether the
        slot's next token is sampled from the last row (its entry ends here, and its format,
        if any, still goes on)."""
        d = span.decode
        k = request.params.logprobs
        if k is not None and d.n_forced:
            entries = outcome.forced_entries.setdefault(d.slot, [])
            if span.start == 0 and d.lead_forced:
                if request.lead_entry is None:
                    raise ValueError(
                        "the first forced token has no entry from the prompt's last row"
                    )
                entries.append(request.lead_entry)
            for j in range(span.start, min(span.end, len(d.tokens) - 1)):
                row = self.context.logits_row(first + j - span.start)
                entry = entry_for(row, row_stats(row, k), d.tokens[j + 1], self.model.piece)
                entries.append(_forced(entry))
        matcher = request.matcher
        return span.end == len(d.tokens) and (matcher is None or not matcher.is_stopped())

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
        """Every option's first-token log-probability, from one row, then the row's highest
        (which option tokens are greedy: ``ChoiceScoring.take_first``)."""
        assert request.choice is not None
        row = self.context.logits_row(index)
        lse = row_stats(row, 0).lse
        return [float(row[t]) - lse for t in request.choice.first_tokens] + [float(row.max()) - lse]

    def _masks_ahead(
        self, plan: StepPlan, requests: Mapping[int, Request]
    ) -> Future[MaskResult] | None:
        """Start filling the token masks of the plan's constrained slots, to overlap the decode
        (see ``_masks``). A slot that samples nothing this step (a format that is complete, a
        prompt whose format forces its first tokens) gets none."""
        sampled = [d.slot for d in plan.decodes] + [
            c.slot for c in plan.chunks if c.ends_prompt and not requests[c.slot].start_forced
        ]
        matchers = [
            (slot, m)
            for slot in sampled
            if (m := requests[slot].matcher) is not None
            and not m.is_stopped()
            and (self.greedy_masks_ahead or not isinstance(requests[slot].sampler, GreedySampler))
        ]
        return self.masks.ahead(matchers)

    def _decode(self) -> int:
        start = time.perf_counter()
        status = self.context.decode(self.batch)
        self.times.add("decode", time.perf_counter() - start)
        return status

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
            times = self.times
            if matcher is not None and isinstance(sampler, GreedySampler):
                token = self.masks.pick_greedy(row, matcher, slot, mask)
            elif mask is None:
                token = sampler.sample(self.context, index)
            else:
                start = time.perf_counter()
                apply_mask(row, mask)  # the chain reads this row in place: allowed tokens only
                masked = time.perf_counter()
                token = sampler.sample(self.context, index)
                times.add("masking", masked - start)
                times.add("sampling", time.perf_counter() - masked)
                times.masks_applied += 1
            if stats is not None:
                outcome.logprobs[slot] = entry_for(row, stats, token, self.model.piece)
            if matcher is not None:
                start = time.perf_counter()
                consumed = matcher.consume_token(token)
                times.add("guidance", time.perf_counter() - start)
                times.sampled += 1
                if not consumed:
                    raise ValueError(f"the format refused token {token}: {matcher.get_error()}")
            outcome.tokens[slot] = token
        except Exception as exc:  # one slot's sampler: that request fails, the step goes on
            outcome.failures[slot] = f"sampling failed: {type(exc).__name__}: {exc}"

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

    def _fill(self, plan: StepPlan, requests: Mapping[int, Request]) -> list[Row]:
        """Put the plan in the batch; the rows to read after the decode.

        A decode entry with forced tokens goes in as one span of its sequence,
        with a row for its last token (for every token with logprobs).
        """
        batch = self.batch
        batch.clear()
        rows: list[Row] = []
        for d in plan.decodes:
            if len(d.tokens) == 1:
                index = batch.add(d.token, d.pos, d.slot, True)
            else:
                with_rows = requests[d.slot].params.logprobs is not None
                tokens = np.asarray(d.tokens, dtype=np.int32)
                index = batch.add_span(
                    tokens, d.pos, d.slot, True, logits_from=d.pos if with_rows else None
                )
            rows.append((d.slot, index, Span(d, 0, len(d.tokens))))
        rows += [(c.slot, self._add_chunk(c, requests[c.slot]), c) for c in plan.chunks]
        return rows

    def _add_chunk(self, chunk: Chunk, request: Request) -> int:
        """A prompt chunk into the batch, with a row wherever one is read; its first batch index."""
        tokens = request.tokens[chunk.start : chunk.start + chunk.count]
        return self.batch.add_span(
            tokens, chunk.start, chunk.slot, chunk.ends_prompt, logits_from=request.logits_from
        )

    def close(self) -> None:
        self.masks.close()
        self.context.close()


def _forced(entry: TokenLogprob) -> TokenLogprob:
    """An entry marked as a token the format forced (taken without sampling)."""
    entry["forced"] = True
    return entry
