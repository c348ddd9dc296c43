"""The waiting queue: bounded, highest priority first, first come first served within a priority."""

from __future__ import annotations

import heapq
import itertools
from typing import Generic, TypeVar

from ..exceptions import QueueFullError

__all__ = ["WaitingQueue"]

T = TypeVar("T")


class WaitingQueue(Generic[T]):
    """Not thread-safe on its own: the engine holds its lock around every call.

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

    def push_all(self, items: list[tuple[T, int]]) -> None:
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
        return [item for _, _, item in sorted(self._heap) if id(item) in self._live]

    def drain(self) -> list[T]:
        out = self.items()
        self._heap.clear()
        self._live.clear()
        return out
