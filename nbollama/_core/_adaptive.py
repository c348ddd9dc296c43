"""Adaptive parallelism: how many slots take requests, moved while the engine runs.

The advice the Ollama guides end on is "measure each model's best
parallelism, watch latency and load, adjust". This controller does it:

* it learns what a decode step costs with k rows (``StepCostModel``, from
  the engine's own steps), so it can predict each request's speed (one
  token per step) and the aggregate throughput (k tokens per step) at any k;
* it moves the number of active slots towards the target: a per-request
  speed floor (``min_tps``), a time-to-first-token ceiling (``max_ttft``), or,
  with neither, the most throughput short of where one more slot gains less
  than ``GAIN_THRESHOLD``.

Stability: one decision per window, growth only under demand, a shrink
only after two windows below target (a burst's prefill is not a trend),
and a grown value that failed its target is not tried again until the cost
model says otherwise. Shrinking never cancels: slots above the new count
finish their requests and take no new ones. The class is pure (a clock is
passed in), so it is tested without a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..exceptions import InvalidParamsError

__all__ = [
    "Target",
    "StepCostModel",
    "Decision",
    "ParallelController",
    "WINDOW_SECONDS",
    "GAIN_THRESHOLD",
]

#: Seconds between two decisions.
WINDOW_SECONDS = 1.0
#: With no target, one more slot must add at least this much throughput.
GAIN_THRESHOLD = 0.05
#: Hysteresis around a per-request speed floor.
_FLOOR_MARGIN = 0.05
#: Seconds before a slot count that missed its target is tried again.
_FAILED_COOLDOWN = 30.0


@dataclass(frozen=True)
class Target:
    """What adaptive parallelism aims at: at most one of a speed floor and a TTFT ceiling."""

    min_tps: float | None = None
    max_ttft: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_tps", "max_ttft"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise InvalidParamsError(f"{name}={value!r}: must be a number > 0")
        if self.min_tps is not None and self.max_ttft is not None:
            raise InvalidParamsError(
                "give one target: min_tps (a per-request speed floor) or max_ttft, not both"
            )

    def __str__(self) -> str:
        if self.min_tps is not None:
            return f"min_tps={self.min_tps:g}"
        if self.max_ttft is not None:
            return f"max_ttft={self.max_ttft:g}"
        return "throughput"


class StepCostModel:
    """Seconds per decode step as a function of its rows, learned from the engine's steps."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.seconds: dict[int, float] = {}
        self.counts: dict[int, int] = {}

    def add(self, rows: int, seconds: float) -> None:
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else old + self.alpha * (seconds - old)
        self.counts[rows] = self.counts.get(rows, 0) + 1

    def known(self, rows: int, min_count: int = 3) -> bool:
        return self.counts.get(rows, 0) >= min_count

    def predict(self, rows: int) -> float | None:
        """Interpolated between measured row counts. Beyond the largest, the last slope, and with one
        point a cost proportional to the rows: pessimistic (steps cost less than that), so the
        controller climbs towards a limit instead of jumping past it."""
        points = sorted((k, s) for k, s in self.seconds.items() if self.counts[k] >= 3)
        if not points:
            return None
        if len(points) == 1 or rows > points[-1][0]:
            (k1, s1) = points[-1]
            if len(points) == 1 or rows < points[0][0]:
                return s1 * rows / k1
            (k0, s0) = points[-2]
            return s1 + max((s1 - s0) / (k1 - k0), 0.0) * (rows - k1)
        if rows <= points[0][0]:
            return points[0][1] * rows / points[0][0]
        for (k0, s0), (k1, s1) in zip(points, points[1:]):
            if k0 <= rows <= k1:
                return s0 + (s1 - s0) * (rows - k0) / (k1 - k0)
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class Decision:
    parallel: int
    reason: str


class ParallelController:
    """Decides the number of active slots (1..max_parallel) from measured figures."""

    def __init__(self, max_parallel: int, target: Target, *, start: int | None = None) -> None:
        self.max_parallel = max_parallel
        self.target = target
        self.active = max(
            1, min(max_parallel, start if start is not None else min(4, max_parallel))
        )
        self.cost = StepCostModel()
        self.reason = f"parallel={self.active} of {max_parallel}: starting point, target {target}"
        self._window_start: float | None = None
        self._steps = 0  # decode steps in this window
        self._step_seconds = 0.0  # their duration: a request's speed is one token per step
        self._busy_steps = 0  # steps where every active slot was generating
        self._ttfts: list[float] = []
        self._below = 0  # consecutive windows under the target
        self._failed: dict[int, float] = {}  # active value -> when it missed its target
        self._comfortable = 0
        self._draining = False  # this window had more rows than active slots

    def calibrate(self, timings: Sequence[tuple[int, float]]) -> None:
        """Learn from decode steps timed at load, and start where they say the target holds.

        With a speed floor the starting count is the largest the timings
        predict to keep it; otherwise the default start stays (demand decides).
        """
        for rows, seconds in timings:
            self.cost.add(rows, seconds)
        floor = self.target.min_tps
        if floor is None:
            return
        best = self._best_under_floor(floor) or 1
        step = self.cost.predict(best)
        self.active = best
        shown = f"{1.0 / step:.1f}" if step else "?"
        self.reason = (
            f"parallel={best} of {self.max_parallel}: starting point, predicted per-request {shown} tok/s "
            f"from steps timed at load, floor {floor:g}"
        )

    # -- what the engine reports -----------------------------------------------------

    def step(self, now: float, rows: int, seconds: float, decode_only: bool) -> None:
        """A step decoded ``rows`` generating slots in ``seconds`` (prefill steps do not teach the model)."""
        if self._window_start is None:
            self._window_start = now
        if rows > self.active:
            self._draining = True  # slots above a shrunk count still finish: not this count's speed
        if rows > 0:
            self._steps += 1
            self._step_seconds += seconds
            if rows >= self.active:
                self._busy_steps += 1
            if decode_only:
                self.cost.add(rows, seconds)

    def first_token(self, ttft: float) -> None:
        self._ttfts.append(ttft)

    # -- deciding ---------------------------------------------------------------------

    def decide(self, now: float, queue_length: int, generating: int) -> Decision | None:
        """At most once per window: a new active count and why, or None to keep it.

        A queue under a speed floor is answered at once, not at the window's
        end: as soon as a few decode steps at the current count were timed,
        the controller may grow (a burst), never shrink (that takes two windows).
        """
        if self._window_start is None:
            return None
        if now - self._window_start < WINDOW_SECONDS:
            return self._grow_for_queue(now, queue_length)
        per_request = (
            self._steps / self._step_seconds if self._steps else None
        )  # one token per step
        saturated = self._busy_steps >= max(1, self._steps // 2) and generating >= self.active
        demand = queue_length > 0 or saturated
        ttfts, self._ttfts = self._ttfts, []
        draining, self._draining = self._draining, False
        self._window_start, self._steps, self._step_seconds, self._busy_steps = now, 0, 0.0, 0
        if draining:
            self._below = 0
            return None  # judged once the slots taken away have finished
        if self.target.min_tps is not None:
            choice = self._for_floor(now, per_request, demand, generating)
        elif self.target.max_ttft is not None:
            choice = self._for_ttft(now, ttfts, queue_length, demand)
        else:
            choice = self._for_throughput(demand)
        if choice is None or choice.parallel == self.active:
            return None
        self.active = choice.parallel
        self.reason = choice.reason
        return choice

    def _grow_for_queue(self, now: float, queue_length: int) -> Decision | None:
        k = self.active
        if (
            self.target.min_tps is None
            or queue_length == 0
            or k >= self.max_parallel
            or self.cost.counts.get(k, 0) < 3
            or self._steps < 3
        ):
            return None
        choice = self._grow_under_floor(now, None)
        if choice is None:
            return None
        self._window_start, self._steps, self._step_seconds, self._busy_steps = now, 0, 0.0, 0
        self._ttfts = []
        self._below = 0
        self.active = choice.parallel
        self.reason = choice.reason
        return choice

    def _best_under_floor(self, floor: float) -> int | None:
        """The largest k whose predicted per-request speed keeps ``floor``: 0 if none does, None if nothing is known."""
        best = 0
        for k in range(1, self.max_parallel + 1):
            seconds = self.cost.predict(k)
            if seconds is None:
                return None
            if 1.0 / seconds >= floor * (1 + _FLOOR_MARGIN):
                best = k
        return best

    def _explore(self, k: int, speed: float | None, floor: float) -> int:
        """How far to grow past what the cost model has seen, from the speed measured at ``k``.

        Extrapolating a step's cost from small batches is pessimistic (rows get
        cheaper as batches grow), so at the edge of what was measured the
        controller tries more slots outright: up to twice as many while the
        measured speed leaves that much headroom, one at a time when it leaves
        little, none within twice the hysteresis margin of the floor. A try
        that misses the floor comes back down after two windows and is not
        tried again for a while.
        """
        if speed is None or speed < floor * (1 + 2 * _FLOOR_MARGIN):
            return k  # too close to the floor for one more slot to keep it
        measured = [rows for rows in self.cost.seconds if self.cost.known(rows)]
        if measured and max(measured) > k:
            return k  # the model has measured beyond k: trust its interpolation
        headroom = speed / floor  # tokens/s per request scale roughly as 1 / rows here
        return min(self.max_parallel, max(k + 1, min(2 * k, math.floor(k * headroom))))

    def _for_floor(
        self, now: float, speed: float | None, demand: bool, generating: int
    ) -> Decision | None:
        floor = self.target.min_tps
        assert floor is not None
        k, top = self.active, self.max_parallel
        if (
            speed is not None
            and generating >= max(1, k - 1)
            and speed < floor * (1 - _FLOOR_MARGIN)
        ):
            self._below += 1
            if self._below < 2:  # one window: maybe a burst's prefill; two in a row: a trend
                return None
            self._below = 0
            self._failed[k] = now  # not tried again for a while, whatever the model says
            best = self._best_under_floor(floor)
            new = max(1, min(k - 1, best if best is not None else k - 1))
            return Decision(
                new,
                f"parallel={new} of {top}: per-request {speed:.1f} tok/s at {k}, floor {floor:g}",
            )
        self._below = 0
        if not demand or k >= top or not self.cost.known(k):
            return None
        return self._grow_under_floor(now, speed)

    def _grow_under_floor(self, now: float, speed: float | None) -> Decision | None:
        """More slots, as far as the cost model (and exploring past it) says the floor holds."""
        floor = self.target.min_tps
        assert floor is not None
        k, top = self.active, self.max_parallel
        step = self.cost.predict(k)
        decode_speed = 1.0 / step if step else None  # decode-only: what a request gets between prefills
        best = self._best_under_floor(floor) or k
        new = max(best, self._explore(k, decode_speed, floor))
        while new > k and now - self._failed.get(new, -math.inf) < _FAILED_COOLDOWN:
            new -= 1
        if new <= k:
            return None
        shown = "?" if decode_speed is None else f"{decode_speed:.1f}"
        return Decision(
            new,
            f"parallel={new} of {top}: per-request {shown} tok/s at {k}, floor {floor:g}, more demand",
        )

    def _for_ttft(
        self, now: float, ttfts: Sequence[float], queue_length: int, demand: bool
    ) -> Decision | None:
        ceiling = self.target.max_ttft
        assert ceiling is not None
        k, top = self.active, self.max_parallel
        worst = max(ttfts) if ttfts else None
        if (worst is not None and worst > 0.8 * ceiling) or (queue_length > k and demand):
            self._comfortable = 0
            if k >= top:
                return None
            new = min(top, max(k + 1, k * 2 if queue_length > k else k + 1))
            shown = "no first token yet" if worst is None else f"worst TTFT {worst:.2f} s"
            return Decision(
                new,
                f"parallel={new} of {top}: {shown}, {queue_length} queued, ceiling {ceiling:g} s",
            )
        if worst is not None and worst < 0.3 * ceiling and queue_length == 0:
            self._comfortable += 1
            if self._comfortable >= 5 and k > 1:  # long comfortable: give per-request speed back
                self._comfortable = 0
                return Decision(
                    k - 1,
                    f"parallel={k - 1} of {top}: worst TTFT {worst:.2f} s, far under {ceiling:g} s",
                )
        return None

    def _for_throughput(self, demand: bool) -> Decision | None:
        k, top = self.active, self.max_parallel
        if not demand or k >= top:
            return None
        now_s, next_s = self.cost.predict(k), self.cost.predict(k + 1)
        if now_s is None or not self.cost.known(k):
            return None
        if next_s is None or not self.cost.known(k + 1):
            new = min(top, k + max(1, k // 2))  # unexplored: try more slots
            return Decision(
                new, f"parallel={new} of {top}: exploring ({k / now_s:.0f} tok/s at {k})"
            )
        gain = ((k + 1) / next_s) / (k / now_s) - 1
        if gain >= GAIN_THRESHOLD:
            return Decision(
                k + 1, f"parallel={k + 1} of {top}: one more slot adds {gain:.0%} throughput"
            )
        return None
