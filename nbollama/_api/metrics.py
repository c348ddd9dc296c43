"""Throughput and latency figures, named as in the design: ttft, tpot, queue_wait, throughput.

The engine feeds a ``ThroughputMeter`` once per step; benchmarks, the sweep
and the notebooks summarise lists of ``Result`` with ``summarize``.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .requests import Result

__all__ = ["ThroughputMeter", "RunSummary", "summarize", "percentile"]


class ThroughputMeter:
    """Generated tokens per second over a sliding window."""

    def __init__(self, window: float = 3.0) -> None:
        self.window = window
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self._started = time.monotonic()

    def add(self, tokens: int, now: float | None = None) -> None:
        if tokens <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            self._events.append((now, tokens))
            self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            tokens = sum(n for _, n in self._events)
        span = min(self.window, max(now - self._started, 1e-3))
        return tokens / span

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window:
            self._events.popleft()


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass(frozen=True)
class RunSummary:
    """One batch of requests fired together, summarised."""

    requests: int
    completion_tokens: int
    wall_time: float
    throughput: float  # completion tokens / wall time
    mean_ttft: float
    p95_ttft: float
    mean_gen_tps: float  # mean of each request's own tokens/s
    mean_queue_wait: float


def summarize(results: Iterable[Result], wall_time: float) -> RunSummary:
    results = list(results)
    tokens = sum(r.completion_tokens for r in results)
    ttfts = [r.ttft for r in results if r.ttft is not None]
    speeds = [r.gen_tps for r in results if r.gen_tps is not None]
    waits = [r.queue_wait for r in results]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else math.nan

    return RunSummary(
        requests=len(results),
        completion_tokens=tokens,
        wall_time=wall_time,
        throughput=tokens / wall_time if wall_time > 0 else math.nan,
        mean_ttft=mean(ttfts),
        p95_ttft=percentile(ttfts, 95),
        mean_gen_tps=mean(speeds),
        mean_queue_wait=mean(waits),
    )
