"""Adaptive parallelism: the controller against a simulated engine, then the real engine."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nbollama import Engine, InvalidParamsError
from nbollama._core._adaptive import WINDOW_SECONDS, ParallelController, StepCostModel, Target

PROMPTS_FILE = Path(__file__).resolve().parents[2] / "shared" / "bench" / "prompts.jsonl"
PROMPTS = [json.loads(line)["prompt"] for line in PROMPTS_FILE.read_text().splitlines()]


def simulate(
    controller: ParallelController, cost, seconds: float, *, queue: int = 50, start: float = 0.0
) -> list[tuple[float, int]]:
    """Run a saturated engine whose decode steps cost ``cost(rows)`` from ``start``; the (time, active) changes."""
    now, changes = start, []
    while now < start + seconds:
        rows = controller.active
        step = cost(rows)
        now += step
        controller.step(now, rows, step, decode_only=True)
        decision = controller.decide(now, queue, rows)
        if decision is not None:
            changes.append((now - start, decision.parallel))
    return changes


def cpu_like(rows: int) -> float:
    """A 2-core CPU's shape: a fixed cost per step plus a bit per row (about what this model costs)."""
    return 0.010 + 0.004 * rows


def test_a_speed_floor_settles_at_the_largest_count_that_keeps_it_and_stays_there() -> None:
    controller = ParallelController(16, Target(min_tps=15))
    changes = simulate(controller, cpu_like, 60)
    # 1 / (0.010 + 0.004 k) >= 15 x 1.05 holds up to k = 13
    assert controller.active == 13, changes
    assert all(t < 30 for t, _ in changes), changes  # nothing moves in the second half
    assert max(p for _, p in changes) <= 16


def test_the_controller_learns_the_cost_of_a_step() -> None:
    model = StepCostModel()
    assert model.predict(4) is None
    for _ in range(3):
        model.add(4, 0.026)
        model.add(8, 0.042)
    assert model.predict(6) == pytest.approx(0.034)
    assert model.predict(12) == pytest.approx(0.058)  # the last slope, beyond what was seen
    assert model.predict(2) == pytest.approx(0.013)


def test_without_demand_nothing_moves_and_a_burst_raises_it() -> None:
    controller = ParallelController(16, Target(min_tps=15))
    now = 0.0
    for _ in range(200):  # two slots busy of four, nothing queued
        now += cpu_like(2)
        controller.step(now, 2, cpu_like(2), decode_only=True)
        assert controller.decide(now, 0, 2) is None
    assert controller.active == 4
    changes = simulate(controller, cpu_like, 10, queue=40, start=now)
    assert changes and changes[0][1] > 4 and changes[0][0] < 3 * WINDOW_SECONDS  # a fast reaction


def test_a_slower_machine_brings_the_count_down_under_the_floor() -> None:
    controller = ParallelController(16, Target(min_tps=15))
    simulate(controller, cpu_like, 20)
    settled = controller.active
    changes = simulate(
        controller, lambda rows: 2 * cpu_like(rows), 20, start=20
    )  # something took half the CPU
    assert controller.active < settled
    assert changes[0][1] < settled
    assert "floor 15" in controller.reason


def test_with_no_target_it_stops_where_one_more_slot_gains_little() -> None:
    controller = ParallelController(32, Target())
    simulate(controller, lambda rows: 0.010 + 0.004 * rows + 0.0004 * rows * rows, 60)
    k = controller.active
    throughput = lambda n: n / (0.010 + 0.004 * n + 0.0004 * n * n)  # noqa: E731
    assert throughput(k + 1) / throughput(k) - 1 < 0.05 or k == 32
    assert 5 <= k <= 32


def test_a_ttft_ceiling_adds_slots_while_the_queue_makes_first_tokens_late() -> None:
    controller = ParallelController(16, Target(max_ttft=2.0))
    now = 0.0
    for _ in range(5):
        now += WINDOW_SECONDS + 0.01
        controller.step(now, controller.active, 0.03, decode_only=True)
        controller.first_token(3.5)  # late
        controller.decide(now, 30, controller.active)
    assert controller.active == 16
    assert "ceiling 2" in controller.reason


def test_targets_are_checked() -> None:
    with pytest.raises(InvalidParamsError, match="not both"):
        Target(min_tps=10, max_ttft=2)
    with pytest.raises(InvalidParamsError, match="min_tps"):
        Target(min_tps=-1)
    assert str(Target(min_tps=15)) == "min_tps=15" and str(Target()) == "throughput"


def test_load_options_for_adaptive_are_checked_before_loading() -> None:
    with pytest.raises(InvalidParamsError, match="only apply with parallel='adaptive'"):
        Engine.load(parallel=4, min_tps=10)
    with pytest.raises(InvalidParamsError, match="max_parallel"):
        Engine.load(parallel="adaptive", max_parallel=0)
    with pytest.raises(InvalidParamsError, match="parallel"):
        Engine.load(parallel="adaptive-ish")  # type: ignore[arg-type]


# -- the real engine ---------------------------------------------------------------------


def test_a_real_burst_raises_the_count_and_every_change_is_in_the_snapshot(
    model_path: Path,
) -> None:
    with Engine.load(model_path, parallel="adaptive", max_parallel=8, ctx=256) as engine:
        assert engine.parallel == 4 and engine.parallel_max == 8
        results = engine.generate(PROMPTS * 2, max_tokens=24, temperature=0.0)
        assert all(r.ok for r in results)
        history = engine.parallel_history
        assert history and max(h["parallel"] for h in history) > 4
        snap = engine.snapshot()
        assert snap["parallel_max"] == 8 and snap["parallel"] == history[-1]["parallel"]
        assert snap["adaptive"] == {"target": "throughput", "history": history}
        assert snap["parallel_reason"] == history[-1]["reason"]
        assert all(h["reason"].startswith(f"parallel={h['parallel']} of 8") for h in history)


def test_an_unreachable_floor_shrinks_without_cancelling_anything(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # without the timings taken at load it starts at 4, so the floor must bring it down while requests run
    monkeypatch.setattr(ParallelController, "calibrate", lambda self, timings: None)
    with Engine.load(
        model_path, parallel="adaptive", max_parallel=6, min_tps=10_000, ctx=256
    ) as engine:
        handles = engine.submit_many(PROMPTS[:12], max_tokens=48, temperature=0.0)
        deadline = time.monotonic() + 120
        while engine.parallel > 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        results = [h.result(timeout=120) for h in handles]
        assert engine.parallel <= 2  # no per-request speed is that high: it came down
        assert all(
            r.finish_reason in ("stop", "length") for r in results
        )  # nothing cancelled to shrink
        assert engine.snapshot()["totals"]["cancelled"] == 0
        assert any("floor 10000" in h["reason"] for h in engine.parallel_history)


def test_under_a_steady_real_load_the_count_settles_and_stays_put(model_path: Path) -> None:
    """Eight requests always in flight for about ten seconds: no change in the last half of the run."""
    with Engine.load(model_path, parallel="adaptive", max_parallel=8, min_tps=5, ctx=256) as engine:
        start = time.time()
        results = engine.generate(PROMPTS[:8] * 6, max_tokens=24, temperature=0.0)
        end = time.time()
        assert all(r.ok for r in results)
        middle = start + (end - start) / 2
        late = [h for h in engine.parallel_history if h["time"] >= middle]
        assert engine.parallel == 8  # every slot keeps a floor this low
        assert not late, f"changed in the last half of a steady run: {late}"


def test_a_floor_starts_where_the_steps_timed_at_load_say_it_holds(model_path: Path) -> None:
    with Engine.load(model_path, parallel="adaptive", max_parallel=8, min_tps=10_000, ctx=256) as engine:
        assert engine.parallel == 1 and "timed at load" in engine.parallel_reason
    with Engine.load(model_path, parallel="adaptive", max_parallel=8, min_tps=1, ctx=256) as engine:
        assert engine.parallel == 8 and "floor 1" in engine.parallel_reason
