"""What runs next: the waiting queue, admission into slots, and the plan of each step.

The plan is vLLM v1's idea on llama.cpp's batch: one token budget per step
(``n_batch``), spent first on one token for every generating slot, then on
prompt chunks of prefilling slots in the order they were admitted. There are
no separate prefill and decode phases, so a long prompt is prefilled over
several steps while the other slots keep streaming. ``plan_step`` is pure: it
reads slots and returns a ``StepPlan``; it is tested without a model.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..exceptions import QueueFullError
from ._slots import Request, Slot

__all__ = ["WaitingQueue", "Decode", "Chunk", "StepPlan", "plan_step", "Scheduler"]

T = TypeVar("T")


class WaitingQueue(Generic[T]):
    """Bounded; highest priority first, first come first served within a priority.

    Not thread-safe on its own: the engine holds its lock around every call.
    Removal is lazy (a removed entry stays in the heap, marked), so cancelling
    a queued request is O(1) and ``len()`` still counts only live entries.
    """

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"max queue size must be >= 1, got {max_size}")
        self.max_size = max_size
        self._heap: list[tuple[int, int, T]] = []
        self._order = itertools.count()
        self._live: set[int] = set()  # id() of queued items

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, item: T) -> bool:
        return id(item) in self._live

    def push_all(self, items: Sequence[tuple[T, int]]) -> None:
        """Queue (item, priority) pairs all together, or none of them if they do not all fit."""
        if len(items) > self.max_size:
            raise QueueFullError(
                f"{len(items)} prompts at once are more than the queue holds ({self.max_size}); "
                "send them in smaller groups or raise NBOLLAMA_MAX_QUEUE"
            )
        if len(self._live) + len(items) > self.max_size:
            raise QueueFullError(
                f"the engine is busy: {len(self._live)} requests are already waiting and "
                f"{len(items)} more do not fit (queue limit {self.max_size}, set "
                "NBOLLAMA_MAX_QUEUE to change it); wait for some to finish or cancel them"
            )
        for item, priority in items:
            heapq.heappush(self._heap, (-priority, next(self._order), item))
            self._live.add(id(item))

    def pop(self) -> T | None:
        while self._heap:
            _, _, item = heapq.heappop(self._heap)
            if id(item) in self._live:
                self._live.discard(id(item))
                return item
        return None

    def remove(self, item: T) -> bool:
        if id(item) in self._live:
            self._live.discard(id(item))
            return True
        return False

    def items(self) -> list[T]:
        """Live entries in the order they would be served."""
        return [item for _, _, item in sorted(self._heap, key=lambda e: e[:2]) if id(item) in self._live]

    def drain(self) -> list[T]:
        out = self.items()
        self._heap.clear()
        self._live.clear()
        return out


@dataclass(frozen=True)
class Decode:
    """The next token of a generating slot."""

    slot: int
    token: int
    pos: int


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
    def n_tokens(self) -> int:
        return len(self.decodes) + self.prefill_tokens

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


def plan_step(slots: Sequence[Slot], token_budget: int) -> StepPlan:
    """One token per generating slot, then prompt chunks (oldest admission first) up to the budget."""
    decodes = tuple(Decode(s.id, s.last_token, s.n_past) for s in slots if s.state == "generating")
    prefilling = sorted(
        (s for s in slots if s.state == "prefill" and s.request is not None),
        key=lambda s: s.request.admitted_order,  # type: ignore[union-attr]
    )
    wanted = [
        Chunk(s.id, s.request.n_prefilled, s.request.prefill_remaining, True)  # type: ignore[union-attr]
        for s in prefilling
        if s.request.prefill_remaining > 0  # type: ignore[union-attr]
    ]
    return StepPlan(decodes, _spend(wanted, token_budget - len(decodes)))


class Scheduler:
    """The queue and admission: which waiting request goes into which idle slot.

    Called with the engine's lock held; it only moves requests, it never
    touches llama.cpp.
    """

    def __init__(self, max_queue: int) -> None:
        self.queue: WaitingQueue[Request] = WaitingQueue(max_queue)
        self._admitted = itertools.count()

    def push_all(self, requests: Sequence[Request]) -> None:
        self.queue.push_all([(r, r.priority) for r in requests])

    def admit(self, slots: Sequence[Slot]) -> list[tuple[Slot, Request]]:
        """Give idle slots the next queued requests (highest priority first, lowest slot first)."""
        admitted: list[tuple[Slot, Request]] = []
        for slot in slots:
            if slot.busy:
                continue
            request = self.queue.pop()
            if request is None:
                break
            slot.take(request, next(self._admitted))
            admitted.append((slot, request))
        return admitted

    @staticmethod
    def victim(slots: Sequence[Slot]) -> Slot | None:
        """The sequence to fail when not even one token per slot fits in the KV cache: the longest."""
        busy = [s for s in slots if s.busy]
        return max(busy, key=lambda s: s.n_past) if busy else None
