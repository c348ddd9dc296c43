"""What runs next: the waiting queue, admission into slots, and the plan of each step.

The plan is vLLM v1's idea on llama.cpp's batch: one token budget per step
(``n_batch``), spent first on one token for every generating slot, then on
prompt chunks of prefilling slots in the order they were admitted. There are
no separate prefill and decode phases, so a long prompt is prefilled over
several steps while the other slots keep streaming. ``plan_step`` is pure: it
reads slots and returns a ``StepPlan``; it is tested without a model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from .._api.queue import WaitingQueue
from ._prefix import choose_slot, find_source
from ._prompt_cache import PromptCache
from ._slots import Request, Slot

__all__ = ["Decode", "Chunk", "StepPlan", "plan_step", "Scheduler", "SCORED_CHUNK"]

#: A chunk whose every position gets a logits row (prompt logprobs, a choice's continuation)
#: holds at most this many tokens: llama.cpp keeps an output buffer of n_vocab floats per row
#: (1 MiB each with Gemma's 262k vocabulary), sized by the largest step it has seen.
SCORED_CHUNK = 64


@dataclass(frozen=True)
class Decode:
    """A generating slot's entry: its sampled token, then the tokens its format forces after it.

    ``lead_forced``: ``token`` is forced too (a format that forces its first
    tokens: nothing was sampled before them). The sample is read from the
    entry's last row; forced tokens are accepted once decoded.
    """

    slot: int
    token: int
    pos: int
    forced: tuple[int, ...] = ()
    lead_forced: bool = False

    @property
    def tokens(self) -> tuple[int, ...]:
        return (self.token, *self.forced)

    @property
    def n_forced(self) -> int:
        return len(self.forced) + self.lead_forced


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens ``[start, start + count)`` of a prefilling slot; logits when it ends the prompt."""

    slot: int
    start: int
    count: int
    ends_prompt: bool


@dataclass(frozen=True)
class StepPlan:
    """What one ``llama_decode`` holds."""

    decodes: tuple[Decode, ...] = ()
    chunks: tuple[Chunk, ...] = ()

    @property
    def prefill_tokens(self) -> int:
        return sum(c.count for c in self.chunks)

    @property
    def decode_tokens(self) -> int:
        return sum(1 + len(d.forced) for d in self.decodes)

    @property
    def n_tokens(self) -> int:
        return self.decode_tokens + self.prefill_tokens

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.chunks

    @property
    def slots(self) -> set[int]:
        return {d.slot for d in self.decodes} | {c.slot for c in self.chunks}

    def shrink_prefill(self) -> StepPlan | None:
        """The same step with half the prompt tokens (for when the KV cache has no room); None
        when there is no prefill left to halve."""
        total = self.prefill_tokens
        if total <= 1:
            return None
        return StepPlan(self.decodes, _spend(self.chunks, total // 2))


def _spend(chunks: Sequence[Chunk], budget: int) -> tuple[Chunk, ...]:
    out: list[Chunk] = []
    for chunk in chunks:
        if budget <= 0:
            break
        n = min(budget, chunk.count)
        out.append(Chunk(chunk.slot, chunk.start, n, chunk.ends_prompt and n == chunk.count))
        budget -= n
    return tuple(out)


def plan_step(
    slots: Sequence[Slot], token_budget: int, *, chunk_size: int | None = None
) -> StepPlan:
    """Each generating slot's entry (its token, and forced ones), then prompt chunks (oldest
    admission first) up to the budget.

    With ``chunk_size`` (reproducible mode) a prompt is cut only at multiples
    of it, counted from position 0, so its chunks depend on nothing else; a
    chunk that does not fit the budget waits for the next step whole.
    """
    decodes = tuple(
        Decode(s.id, s.last_token, s.n_past, s.forced, s.lead_forced)
        for s in slots
        if s.state == "generating"
    )
    prefilling = sorted(  # (slot, its request)
        (
            (s, s.request)
            for s in slots
            if s.state == "prefill" and s.request is not None and s.request.ready_to_prefill
        ),
        key=lambda pair: pair[1].admitted_order,
    )
    budget = token_budget - sum(1 + len(d.forced) for d in decodes)
    if chunk_size is None:
        wanted = []
        for s, request in prefilling:
            count = request.prefill_remaining
            if request.logits_from is not None:
                count = min(count, max(request.logits_from - request.n_prefilled, 0) + SCORED_CHUNK)
            wanted.append(
                Chunk(s.id, request.n_prefilled, count, count == request.prefill_remaining)
            )
        return StepPlan(decodes, _spend(wanted, budget))
    chunks: list[Chunk] = []
    for s, request in prefilling:
        start = request.n_prefilled
        end = min(request.prompt_len, (start // chunk_size + 1) * chunk_size)
        if end - start > budget and (chunks or decodes):
            break
        chunks.append(Chunk(s.id, start, end - start, end == request.prompt_len))
        budget -= end - start
    return StepPlan(decodes, tuple(chunks))


class Scheduler:
    """The queue and admission: which waiting request goes into which idle slot.

    Called with the engine's lock held; it only moves requests, it never
    touches llama.cpp.
    """

    def __init__(
        self,
        max_queue: int,
        *,
        prefix_cache: bool = True,
        chunk_size: int | None = None,
        saved: PromptCache | None = None,
    ) -> None:
        self.queue: WaitingQueue[Request] = WaitingQueue(max_queue)
        self.prefix_cache = prefix_cache
        self.saved = saved if saved is not None else PromptCache(0)  # prompts kept in host RAM
        self.chunk_size = (
            chunk_size  # reproducible mode: prompts are prefilled in these fixed chunks
        )
        self._admitted = itertools.count()

    def push_all(self, requests: Sequence[Request]) -> None:
        self.queue.push_all([(r, r.priority) for r in requests])

    def admit(self, slots: Sequence[Slot], limit: int | None = None) -> list[tuple[Slot, Request]]:
        """Give idle slots the next queued requests (highest priority first).

        Each request goes to the idle slot whose cached tokens share the most
        with its prompt, and may be told to copy a longer shared prefix from
        another slot (``Request.copy_from``) instead of prefilling it, or to
        take a prompt saved in host RAM (``Request.restore``) when that holds
        more of it than the slot. A slot whose cached tokens the request will
        cut hands them over in ``Request.evicts``, to be saved first. With
        ``limit`` (adaptive parallelism) only the first ``limit`` slots take
        requests, and no more than ``limit`` are busy at once: slots above it
        finish what they serve and then rest.
        """
        admitted: list[tuple[Slot, Request]] = []
        limit = len(slots) if limit is None else limit
        room = limit - sum(1 for s in slots if s.busy)
        idle = [s for s in slots[:limit] if not s.busy]
        while idle and room > 0:
            room -= 1
            request = self.queue.pop()
            if request is None:
                break
            align = self.chunk_size or 1
            reuse = self.prefix_cache and request.reuses_prefix
            slot, keep = choose_slot(request, idle, reuse=reuse, align=align)
            idle.remove(slot)
            request.restore = (
                self.saved.best(request.tokens, request.prompt_len, beyond=keep, align=align)
                if reuse
                else None
            )
            if request.restore is not None:
                keep = request.restore[1]
            if self.saved.enabled and (request.restore is not None or keep < len(slot.cache)):
                request.evicts = slot.cache
            slot.take(request, next(self._admitted), keep)
            if reuse:
                request.copy_from = find_source(
                    request, slot, slots, keep, align=align, prompt_only=self.chunk_size is not None
                )
            admitted.append((slot, request))
        return admitted

    @staticmethod
    def victim(slots: Sequence[Slot]) -> Slot | None:
        """The sequence to fail when not even one token per slot fits in the KV cache: the longest."""
        busy = [s for s in slots if s.busy]
        return max(busy, key=lambda s: s.n_past) if busy else None
