"""Postprocess, the last part of an engine step: what its rows gave, taken into the requests.

Sampled tokens become text (stop strings held back), count against
``max_tokens`` and end requests; a choice's scored rows move it on. Where a
format forces the tokens after a sampled one (jump-forward, see ``_jump``),
they are queued into the slot's next batch entry here and taken once that
entry is decoded, with the entries their rows give when logprobs are asked.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._api.base import EngineBase
from .._api.outputs import TokenLogprob
from .._api.requests import FinishReason
from .._logging import logger
from ._adaptive import ParallelController
from ._jump import forced_room, take_forced
from ._llama import LlamaModel
from ._outputs import take_scored
from ._runner import ModelRunner, StepOutcome
from ._scheduler import Decode
from ._slots import Request, Slot

if TYPE_CHECKING:
    from ._config import EngineConfig

__all__ = ["StepIntake"]


class StepIntake(EngineBase[Request]):
    """The postprocess half of ``EngineLoop`` (on the engine's thread)."""

    _config: EngineConfig
    _model: LlamaModel
    _runner: ModelRunner
    _slots: list[Slot]
    _controller: ParallelController | None

    if TYPE_CHECKING:  # defined by EngineLoop and Engine

        @property
        def parallel_max(self) -> int: ...
        @property
        def ctx(self) -> int: ...
        def _resolve_copies(self) -> None: ...
        def _finish(
            self, slot: Slot, reason: FinishReason, *, error: str | None = None, tail: str = ""
        ) -> None: ...

    def step_times(self, *, reset: bool = False) -> dict[str, float]:
        """Where constrained decoding's time went since load (or the last ``reset``): seconds in
        ``decode``, ``guidance`` (llguidance on the engine's thread), ``masks_ahead`` (filled
        during decodes), ``mask_wait``, ``masking`` and ``sampling``; ``steps``, and the
        format's tokens ``sampled`` and ``forced``."""
        return self._runner.times.as_dict(reset=reset)

    def _forced_room(self, request: Request, *, at: int) -> int:
        """Forced tokens a slot may queue whose first would sit at position ``at``."""
        return forced_room(
            max_tokens_left=request.params.max_tokens - request.completion_tokens,
            ctx_left=self.ctx - at,
            n_batch=self._config.n_batch,
            n_seq=self.parallel_max,
            with_rows=request.params.logprobs is not None,
        )

    def _take_forced(self, request: Request, room: int) -> list[int]:
        assert request.matcher is not None
        times = self._runner.times
        start = time.perf_counter()
        forced = take_forced(request.matcher, room)
        times.add("guidance", time.perf_counter() - start)
        times.forced += len(forced)
        if forced and request.sampler is not None:
            request.sampler.accept(forced)  # a repeat penalty counts them as the server's would
        return forced

    def _postprocess(self, outcome: StepOutcome) -> None:
        now = time.perf_counter()
        plan = outcome.plan
        for d in plan.decodes:
            slot = self._slots[d.slot]
            slot.n_past += len(d.tokens)
            slot.forced, slot.lead_forced = (), False
        prompt_tokens = 0
        for c in plan.chunks:
            slot = self._slots[c.slot]
            assert slot.request is not None  # a chunk is planned for a prefilling request
            slot.request.n_prefilled += c.count
            slot.n_past += c.count
            prompt_tokens += c.count
        if any(s.request is not None and s.request.copy_from is not None for s in self._slots):
            self._resolve_copies()  # before any token can finish a source slot
        for slot_id, scored in outcome.scored.items():
            request = self._slots[slot_id].request
            if request is not None and slot_id not in outcome.failures:
                take_scored(request, scored)
        for c in plan.chunks:
            request = self._slots[c.slot].request
            if c.ends_prompt and request is not None and request.choice is not None:
                if c.slot not in outcome.failures:
                    self._advance_choice(self._slots[c.slot], outcome.choice_first.get(c.slot))
        produced = 0
        forced = {d.slot: d for d in plan.decodes if d.n_forced and d.slot not in outcome.failures}
        starting = {  # prompts whose format forces its first tokens: those come next
            c.slot: r.start_forced
            for c in plan.chunks
            if c.ends_prompt and c.slot not in outcome.failures
            and (r := self._slots[c.slot].request) is not None and r.start_forced
        }
        for slot_id in [*starting, *forced, *(s for s in outcome.tokens if s not in forced)]:
            slot = self._slots[slot_id]
            try:
                if slot_id in starting:
                    produced += self._queue_forced(slot, starting[slot_id], now, lead=True)
                else:
                    produced += self._take(slot, forced.get(slot_id), outcome, now)
            except Exception as exc:  # this slot's token handling failed: end this request alone
                logger.warning(
                    "nbollama: request in slot %s failed while handling its token",
                    slot_id,
                    exc_info=True,
                )
                self._finish(
                    slot, "error", error=f"handling its token failed: {type(exc).__name__}: {exc}"
                )
        for slot_id, why in outcome.failures.items():
            self._finish(self._slots[slot_id], "error", error=why)
        self._meter.add(produced)
        with self._lock:
            self._totals.prompt_tokens += prompt_tokens
            self._totals.generated_tokens += produced
            self._seq += 1

    def _advance_choice(self, slot: Slot, first: list[float] | None) -> None:
        """A choice request's prompt or one option's continuation is read: put the prompt back,
        then score the next long option, or decide."""
        request = slot.request
        assert request is not None and request.choice is not None
        choice = request.choice
        prompt_len = len(choice.prompt)
        if first is not None:
            choice.take_first(first)
        elif choice.current is not None:
            choice.take_rest()
            self._runner.keep_prefix(slot.id, prompt_len)  # the continuation's KV goes
            slot.n_past = request.n_prefilled = prompt_len
            request.tokens = choice.prompt
        continuation = choice.next_continuation()
        if continuation is not None:  # its tokens after the prompt, with a row each
            request.tokens = np.concatenate([choice.prompt, continuation])
            request.logits_from = prompt_len
            return
        request.logits_from = None
        option, _ = choice.decide()
        request.handle.timing.first_token = time.perf_counter()
        self._finish(slot, "stop", tail=option)

    def _take(self, slot: Slot, decoded: Decode | None, outcome: StepOutcome, now: float) -> int:
        """A slot's tokens from this step: the forced ones just decoded, then the sampled one,
        then the tokens the format forces after it (queued). Returns tokens produced."""
        request = slot.request
        assert request is not None
        token = outcome.tokens.get(slot.id)
        produced = 0
        if decoded is not None:
            tokens = decoded.tokens if decoded.lead_forced else decoded.forced
            entries = outcome.forced_entries.get(slot.id, [])
            for i, forced in enumerate(tokens):
                entry = entries[i] if i < len(entries) else None
                last = token is None and i == len(tokens) - 1
                produced += self._accept(slot, forced, now, entry, forced=True, last=last)
                if slot.request is not request:
                    return produced  # a stop string, max_tokens, or the format is complete
        if token is None:
            return produced
        produced += self._accept(slot, token, now, outcome.logprobs.get(slot.id))
        if slot.request is request and request.matcher is not None and self._config.jump_forward:
            room = self._forced_room(request, at=slot.n_past + 1)
            following = self._take_forced(request, room)
            if following:
                produced += self._queue_forced(slot, following, now, lead=False)
        return produced

    def _queue_forced(self, slot: Slot, tokens: Sequence[int], now: float, *, lead: bool) -> int:
        """Forced tokens into the slot's next batch entry (after its sampled token, or alone at
        the start); returns tokens produced.

        When nothing is to be read from their rows (no logprobs) and nothing is
        sampled after them (the format is complete), they are taken now instead.
        """
        request = slot.request
        assert request is not None and request.matcher is not None
        if request.params.logprobs is None and request.matcher.is_stopped():
            produced = 0
            for i, token in enumerate(tokens):
                produced += self._accept(slot, token, now, forced=True, last=i == len(tokens) - 1)
                if slot.request is not request:
                    break
            return produced
        if lead:
            slot.last_token, slot.forced, slot.lead_forced = tokens[0], tuple(tokens[1:]), True
            with self._lock:
                slot.state = "generating"
        else:
            slot.forced = tuple(tokens)
        return 0

    def _accept(
        self,
        slot: Slot,
        token: int,
        now: float,
        entry: TokenLogprob | None = None,
        *,
        forced: bool = False,
        last: bool = True,
    ) -> int:
        """Take a token: stream its text or finish the request. Returns tokens produced.

        ``forced``: taken without sampling (already decoded, or about to be).
        ``last``: no other token of this slot follows in this step, so the
        format's end and the context's room are judged here (a format's state
        runs ahead of forced tokens that are still being taken).
        """
        request = slot.request
        assert request is not None and request.text is not None
        handle = request.handle
        if handle.timing.first_token is None:
            handle.timing.first_token = now
            if self._controller is not None:
                self._controller.first_token(now - handle.timing.submitted)
        if self._model.is_eog(token):
            self._finish(slot, "stop")
            return 0
        request.completion_tokens += 1
        request.forced_tokens += forced
        request.output_ids.append(token)
        if entry is not None:
            request.entries.append(entry)
        handle._publish(request.text.feed(self._model.piece(token)), request.completion_tokens)
        matcher = request.matcher
        if request.text.stopped or (last and matcher is not None and matcher.is_stopped()):
            self._finish(slot, "stop")  # a stop string, or a format that is complete
        elif request.completion_tokens >= request.params.max_tokens or (
            last and slot.n_past >= self.ctx
        ):
            self._finish(slot, "length")  # its budget, or the slot's context, is used up
        elif not forced:
            slot.last_token = token
            if slot.state != "generating":
                with self._lock:
                    slot.state = "generating"
        return 1

