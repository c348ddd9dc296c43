"""The waiting queue both engines keep, and its size limit (``NBOLLAMA_MAX_QUEUE``).

Ollama answers HTTP 503 when its queue is full; here a full queue raises
``QueueFullError`` before anything is queued, for the in-kernel and the remote
engine alike.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections.abc import Sequence
from typing import Generic, TypeVar

from ..exceptions import InvalidParamsError, QueueFullError

__all__ = ["WaitingQueue", "MAX_QUEUE_ENV", "DEFAULT_MAX_QUEUE", "resolve_max_queue", "whole_number"]

MAX_QUEUE_ENV = "NBOLLAMA_MAX_QUEUE"
DEFAULT_MAX_QUEUE = 512

T = TypeVar("T")


def whole_number(name: str, value: object, minimum: int, rule: str) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``; else ``InvalidParamsError``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidParamsError(f"{name}={value!r}: {rule}")
    return value


def resolve_max_queue(value: int | None) -> int:
    """The queue limit: ``value`` if given, else ``$NBOLLAMA_MAX_QUEUE``, else 512."""
    if value is not None:
        return whole_number("max_queue", value, 1, "must be a whole number >= 1")
    env = os.environ.get(MAX_QUEUE_ENV)
    if not env:
        return DEFAULT_MAX_QUEUE
    try:
        size = int(env)
    except ValueError:
        raise InvalidParamsError(f"{MAX_QUEUE_ENV}={env!r} is not a whole number") from None
    if size < 1:
        raise InvalidParamsError(f"{MAX_QUEUE_ENV}={size} must be >= 1")
    return size


class WaitingQueue(Generic[T]):
    """Bounded; highest priority first, first come first served within a priority.

    Not thread-safe on its own: the engine holds its lock around every call.
    Removal is lazy (a removed entry stays in the heap, marked), so cancelling
    a queued request is O(1) and ``len()`` still counts only live entries.
    """

    def __init__(self, max_size: int, *, name: str = "the engine's queue") -> None:
        if max_size < 1:
            raise InvalidParamsError(f"max queue size must be >= 1, got {max_size}")
        self.max_size = max_size
        self.name = name
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
                f"{len(items)} prompts at once are more than the queue holds: {self.name} holds "
                f"{self.max_size} requests; send them in smaller groups or raise {MAX_QUEUE_ENV}"
            )
        if len(self._live) + len(items) > self.max_size:
            raise QueueFullError(
                f"busy: {self.name} holds {self.max_size} requests (queue limit {self.max_size}, "
                f"set {MAX_QUEUE_ENV} to change it); {len(self._live)} are already waiting and "
                f"{len(items)} more do not fit; wait for some to finish or cancel them"
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
        return [
            item for _, _, item in sorted(self._heap, key=lambda e: e[:2]) if id(item) in self._live
        ]

    def drain(self) -> list[T]:
        out = self.items()
        self._heap.clear()
        self._live.clear()
        return out
